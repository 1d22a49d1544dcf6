"""Thresholds of a method's map on a split: binary maps (post-processed), their (TP, FP, FN) counts per
volume, pooled Dice at given thresholds, and the 'chosen' thresholds (best Dice on a threshold split,
else leave one volume out) with the oracle best Dice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from anomaly_diffusion.evaluation.postprocess import candidate_thresholds, drop_small_components
from anomaly_diffusion.evaluation.scoring import VolumeScores
from anomaly_diffusion.metrics import best_dice, confusion, counts_dice


def pooled(volumes: Sequence[VolumeScores], method: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([v.scores[method] for v in volumes]),
        np.concatenate([v.truth for v in volumes]),
    )


def best_threshold(volumes: Sequence[VolumeScores], method: str) -> float:
    """The threshold with the best pooled Dice on these volumes (NaN without lesion voxels)."""
    scores, truth = pooled(volumes, method)
    return best_dice(scores, truth)[1] if truth.any() else float("nan")


def binary_map(v: VolumeScores, predicted: np.ndarray, min_component: int = 0) -> np.ndarray:
    """(V,) bool: a binary map of the scored voxels, none outside the eroded brain mask, without its 3D
    components of fewer than `min_component` voxels."""
    if v.eroded_out is not None:
        predicted = predicted & ~v.eroded_out
    if min_component <= 1:
        return predicted
    return v.from_grid(drop_small_components(v.to_grid(predicted, False), min_component))


def volume_counts(v: VolumeScores, method: str, threshold: float, min_component: int = 0) -> np.ndarray:
    """(TP, FP, FN) of `scores > threshold` (in float64), post-processed (`binary_map`), as a (3,) int64 array."""
    return confusion(binary_map(v, v.scores[method].astype(np.float64) > threshold, min_component), v.truth)


def valid_threshold(threshold: float) -> bool:
    return bool(np.isfinite(threshold) or np.isposinf(threshold))


def dice_at(volumes: Sequence[VolumeScores], method: str, thresholds: Sequence[float], min_component: int = 0) -> float:
    """Pooled Dice with one threshold per volume (NaN if any threshold is NaN)."""
    if not all(valid_threshold(t) for t in thresholds):
        return float("nan")
    total = sum(volume_counts(v, method, t, min_component) for v, t in zip(volumes, thresholds, strict=True))
    return float(counts_dice(np.asarray(total)))


@dataclass(frozen=True)
class ChosenThresholds:
    """The 'chosen' thresholds of one method: one per evaluated volume, their summary, and the best Dice."""

    per_volume: list[float]
    chosen: float
    dice_best: float
    threshold_best: float
    table: np.ndarray | None  # (volumes, candidates, 3) counts with components dropped, else None


def choose_thresholds(
    volumes: Sequence[VolumeScores],
    name: str,
    threshold_volumes: Sequence[VolumeScores] | None,
    min_component: int,
) -> ChosenThresholds:
    """Best-Dice thresholds from `threshold_volumes`, else leave one volume out; and the oracle Dice of `volumes`.

    Without component filtering both are exact (`best_dice`, over every threshold); with it they
    are searched over `candidate_thresholds` of the pooled scores.
    """
    scores, truth = pooled(volumes, name)
    n = len(volumes)
    if min_component <= 1:
        dice_best, threshold_best = best_dice(scores, truth)
        if threshold_volumes:
            per_volume = [best_threshold(threshold_volumes, name)] * n
        elif n > 1:
            per_volume = [best_threshold([w for j, w in enumerate(volumes) if j != i], name) for i in range(n)]
        else:
            per_volume = [float("nan")]
        chosen = per_volume[0] if threshold_volumes else float(np.median(per_volume)) if n > 1 else float("nan")
        return ChosenThresholds(per_volume, chosen, dice_best, threshold_best, None)
    grid = candidate_thresholds(scores)
    table = np.stack([np.stack([volume_counts(v, name, t, min_component) for t in grid]) for v in volumes])
    if threshold_volumes:
        t_scores, t_truth = pooled(threshold_volumes, name)
        t_grid = candidate_thresholds(t_scores)
        t_total = sum(np.stack([volume_counts(w, name, t, min_component) for t in t_grid]) for w in threshold_volumes)
        best = t_grid[int(np.argmax(counts_dice(np.asarray(t_total))))] if t_truth.any() else float("nan")
        per_volume = [float(best)] * n
        chosen = float(best)
    elif n > 1:
        total = table.sum(axis=0)
        per_volume = []
        for i in range(n):
            others = total - table[i]
            has_lesion = others[0, 0] + others[0, 2] > 0  # TP + FN: the others' lesion voxels
            per_volume.append(float(grid[int(np.argmax(counts_dice(others)))]) if has_lesion else float("nan"))
        chosen = float(np.median(per_volume))
    else:
        per_volume, chosen = [float("nan")], float("nan")
    dice_grid = counts_dice(table.sum(axis=0))
    k = int(np.argmax(dice_grid))
    dice_best, threshold_best = float(dice_grid[k]), float(grid[k])
    if threshold_volumes and valid_threshold(chosen):  # the chosen threshold is a candidate too: best >= chosen
        at_chosen = dice_at(volumes, name, per_volume, min_component)
        if at_chosen > dice_best:
            dice_best, threshold_best = at_chosen, chosen
    if not truth.any():
        dice_best = threshold_best = float("nan")
    return ChosenThresholds(per_volume, chosen, dice_best, threshold_best, table)


def sum_dice(counts: Sequence[np.ndarray | None]) -> float:
    """Pooled Dice of per-volume (TP, FP, FN) counts; NaN if any volume has none (no valid threshold)."""
    if not counts or any(c is None for c in counts):
        return float("nan")
    return float(counts_dice(np.sum([c for c in counts if c is not None], axis=0)))
