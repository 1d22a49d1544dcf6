"""Percentile-bootstrap 95% intervals over volumes (patients) of a method's metrics: curve metrics
(AUROC, AUPRC, best Dice) from per-volume score histograms, the rest from per-volume parts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from anomaly_diffusion.evaluation.scoring import VolumeScores
from anomaly_diffusion.evaluation.thresholds import ChosenThresholds, sum_dice
from anomaly_diffusion.metrics import auroc, bootstrap_interval, counts_dice, counts_metrics, histogram_counts, size_bin

HISTOGRAM_BINS = 4096
PATIENT_METRICS = ("auroc", "auprc", "dice_best", "dice_slice_otsu", "dice_chosen", "slice_auroc_max")
"""Per-volume metrics averaged over patients (`MethodResult.per_patient`)."""


def nanmean(values: Sequence[float]) -> float:
    finite = [x for x in values if np.isfinite(x)]
    return float(np.mean(finite)) if finite else float("nan")


def small_lesion_voxels(v: VolumeScores, slice_dice: dict[int, float]) -> np.ndarray:
    """(V,) bool: the voxels of the diseased slices whose lesion is 'small' (< 1 cm^2, `size_bin`)."""
    small = [k for k in slice_dice if size_bin(float(v.truth[v.slice_ids == k].sum()) * v.pixel_area_mm2) == "small"]
    return np.isin(v.slice_ids, small)


def histogram_edges(scores: np.ndarray) -> np.ndarray:
    edges = np.unique(np.quantile(scores, np.linspace(0, 1, HISTOGRAM_BINS + 1))) if scores.size else np.zeros(0)
    if len(edges) < 2:
        low = float(scores.min()) if scores.size else 0.0
        edges = np.array([low, low + 1.0])
    return edges


def method_intervals(
    volumes: Sequence[VolumeScores],
    name: str,
    slice_dice: list[dict[int, float]],
    n: int,
    seed: int,
    chosen: ChosenThresholds,
    chosen_counts: Sequence[np.ndarray | None],
    slices: tuple[Sequence[np.ndarray], Sequence[np.ndarray]],
) -> dict[str, tuple[float, float]]:
    """Bootstrap over volumes: curve metrics from per-volume score histograms, the rest from per-volume parts."""
    edges = histogram_edges(np.concatenate([v.scores[name] for v in volumes]))
    counts = [histogram_counts(v.scores[name], v.truth, edges) for v in volumes]

    def otsu_dice(indices: np.ndarray) -> float:
        values = [d for i in indices for d in slice_dice[i].values()]
        return float(np.mean(values)) if values else float("nan")

    def dice_chosen(indices: np.ndarray) -> float:
        return sum_dice([chosen_counts[i] for i in indices])

    maxima, labels = slices

    def slice_auroc(indices: np.ndarray) -> float:
        return auroc(np.concatenate([maxima[i] for i in indices]), np.concatenate([labels[i] for i in indices]))

    ci = {
        metric: bootstrap_interval(pooled_curve_metric(counts, metric), len(volumes), n, seed)
        for metric in ("auroc", "auprc")
    }
    if chosen.table is None:
        ci["dice_best"] = bootstrap_interval(pooled_curve_metric(counts, "dice_best"), len(volumes), n, seed)
    else:
        table = chosen.table

        def best_over_candidates(indices: np.ndarray) -> float:
            total = table[indices].sum(axis=0)
            return float(counts_dice(total).max()) if (total[0, 0] + total[0, 2]) > 0 else float("nan")

        ci["dice_best"] = bootstrap_interval(best_over_candidates, len(volumes), n, seed)
    ci["dice_slice_otsu"] = bootstrap_interval(otsu_dice, len(volumes), n, seed)
    ci["dice_chosen"] = bootstrap_interval(dice_chosen, len(volumes), n, seed)
    ci["slice_auroc_max"] = bootstrap_interval(slice_auroc, len(volumes), n, seed)
    return ci


def pooled_curve_metric(counts: Sequence[tuple[np.ndarray, np.ndarray]], metric: str) -> Callable[[np.ndarray], float]:
    """A bootstrap statistic: `metric` (AUROC, AUPRC, best Dice) pooled over the volumes drawn (`indices`),
    from each volume's (positive, negative) score-histogram counts."""

    def statistic(indices: np.ndarray) -> float:
        pos = np.sum([counts[i][0] for i in indices], axis=0)
        neg = np.sum([counts[i][1] for i in indices], axis=0)
        return counts_metrics(pos, neg)[metric]

    return statistic


def patient_intervals(per_volume: list[dict[str, float]], n: int, seed: int) -> dict[str, tuple[float, float]]:
    """Intervals of the mean over patients of each per-volume metric ('patient.NAME')."""
    values = {k: np.array([m[k] for m in per_volume], dtype=np.float64) for k in PATIENT_METRICS}

    def mean_of(metric: str) -> Callable[[np.ndarray], float]:
        return lambda indices: nanmean(values[metric][indices].tolist())

    return {f"patient.{k}": bootstrap_interval(mean_of(k), len(per_volume), n, seed) for k in PATIENT_METRICS}


def small_lesion_intervals(
    volumes: Sequence[VolumeScores], name: str, slice_dice: list[dict[int, float]], n: int, seed: int
) -> dict[str, tuple[float, float]]:
    """Intervals of the pooled AUROC/AUPRC over the voxels of slices with a small lesion (< 1 cm^2)."""
    masks = [small_lesion_voxels(v, d) for v, d in zip(volumes, slice_dice, strict=True)]
    chosen = [v.scores[name][m] for v, m in zip(volumes, masks, strict=True)]
    edges = histogram_edges(np.concatenate(chosen))
    counts = [histogram_counts(s, v.truth[m], edges) for s, v, m in zip(chosen, volumes, masks, strict=True)]

    return {
        f"small.{metric}": bootstrap_interval(pooled_curve_metric(counts, metric), len(volumes), n, seed)
        for metric in ("auroc", "auprc")
    }
