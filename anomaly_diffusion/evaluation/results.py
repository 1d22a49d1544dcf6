"""The metrics of each method on a split, from the volumes' scores.

Pooled over all voxels of the split (never averaged per image unless stated): pixel AUROC/AUPRC,
Dice at per-slice Otsu thresholds (Wolleb 2022's protocol: mean over diseased slices), Dice at one
threshold chosen on other data (a validation split, else leave one volume out), the best
achievable Dice (oracle), Dice at thresholds set on lesion-free slices for a target false-positive
rate, slice-level detection AUROC, results by lesion size, per volume, and percentile-bootstrap 95%
intervals over volumes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from anomaly_diffusion.errors import InputError
from anomaly_diffusion.evaluation.methods import Method
from anomaly_diffusion.evaluation.scoring import VolumeScores
from anomaly_diffusion.metrics import (
    auprc,
    auroc,
    best_dice,
    bootstrap_interval,
    confusion_at,
    counts_metrics,
    dice_counts,
    histogram_counts,
    per_slice_otsu_dice,
    size_bin,
    slice_scores,
    threshold_at_fpr,
)

HISTOGRAM_BINS = 4096


@dataclass(frozen=True)
class MethodResult:
    """One method's numbers on a split (see the module docstring for each metric).

    `ci` holds percentile-bootstrap 95% intervals over volumes; `per_volume` and `by_size` map a
    subject or a size bin to its metrics; `dice_at_fpr` maps a target FPR ('1%') to the Dice at
    the threshold set on lesion-free slices, `threshold_at_fpr` to that threshold.
    """

    method: str
    description: str
    regime: str
    auroc: float
    auprc: float
    dice_slice_otsu: float
    dice_chosen: float
    threshold_chosen: float
    dice_best: float
    threshold_best: float
    slice_auroc_max: float
    slice_auroc_mean: float
    dice_at_fpr: dict[str, float]
    threshold_at_fpr: dict[str, float]
    ci: dict[str, tuple[float, float]]
    per_volume: dict[str, dict[str, float]]
    by_size: dict[str, dict[str, float]]
    p_healthy_before: float = float("nan")
    p_healthy_after: float = float("nan")


@dataclass(frozen=True)
class EvaluationReport:
    """All methods on one split, with how thresholds were chosen."""

    split: str
    subjects: tuple[str, ...]
    lesion_voxels: int
    voxels: int
    pathological_slices: int
    healthy_slices: int
    threshold_source: str
    median_filter: int
    bootstrap: int
    results: tuple[MethodResult, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


def _pooled(volumes: Sequence[VolumeScores], method: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([v.scores[method] for v in volumes]),
        np.concatenate([v.truth for v in volumes]),
    )


def best_threshold(volumes: Sequence[VolumeScores], method: str) -> float:
    """The threshold with the best pooled Dice on these volumes (NaN without lesion voxels)."""
    scores, truth = _pooled(volumes, method)
    return best_dice(scores, truth)[1] if truth.any() else float("nan")


def _dice_at(volumes: Sequence[VolumeScores], method: str, thresholds: Sequence[float]) -> float:
    """Pooled Dice with one threshold per volume (NaN if any threshold is NaN)."""
    tp = fp = fn = 0
    for v, threshold in zip(volumes, thresholds, strict=True):
        if not np.isfinite(threshold) and not np.isposinf(threshold):
            return float("nan")
        a, b, c = confusion_at(v.scores[method], v.truth, threshold)
        tp, fp, fn = tp + a, fp + b, fn + c
    return dice_counts(tp, fp, fn)


def _slice_table(v: VolumeScores, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slice ids, max score, mean score) of the slices of one volume, and labels via healthy_slices."""
    ids, maxima = slice_scores(v.scores[method], v.slice_ids, "max")
    _, means = slice_scores(v.scores[method], v.slice_ids, "mean")
    return ids, maxima, means


def _volume_metrics(v: VolumeScores, method: str, otsu_dice: dict[int, float]) -> dict[str, float]:
    """One volume's metrics; `otsu_dice` is its `per_slice_otsu_dice` for this method."""
    scores, truth = v.scores[method], v.truth
    ids, maxima, _ = _slice_table(v, method)
    labels = ~np.isin(ids, v.healthy_slices)
    return {
        "auroc": auroc(scores, truth),
        "auprc": auprc(scores, truth),
        "dice_best": best_dice(scores, truth)[0],
        "dice_slice_otsu": float(np.mean(list(otsu_dice.values()))) if otsu_dice else float("nan"),
        "slice_auroc_max": auroc(maxima, labels),
        "lesion_voxels": float(truth.sum()),
    }


def _size_metrics(
    volumes: Sequence[VolumeScores], method: str, slice_dice: Sequence[dict[int, float]]
) -> dict[str, dict[str, float]]:
    """Per lesion-size bin: pooled AUROC/AUPRC over the voxels of the bin's diseased slices, mean Otsu Dice.

    `slice_dice` holds each volume's `per_slice_otsu_dice` for this method.
    """
    grouped: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    for v, otsu_dice in zip(volumes, slice_dice, strict=True):
        for k, d in otsu_dice.items():
            in_slice = v.slice_ids == k
            area = float(v.truth[in_slice].sum()) * v.pixel_area_mm2
            grouped.setdefault(size_bin(area), []).append((v.scores[method][in_slice], v.truth[in_slice], d))
    result: dict[str, dict[str, float]] = {}
    for name in ("small", "medium", "large"):
        items = grouped.get(name, [])
        if not items:
            result[name] = {"slices": 0.0}
            continue
        scores = np.concatenate([s for s, _, _ in items])
        truth = np.concatenate([t for _, t, _ in items])
        result[name] = {
            "slices": float(len(items)),
            "auroc": auroc(scores, truth),
            "auprc": auprc(scores, truth),
            "dice_slice_otsu": float(np.mean([d for _, _, d in items])),
        }
    return result


def evaluate_method(
    volumes: Sequence[VolumeScores],
    method: Method,
    threshold_volumes: Sequence[VolumeScores] | None = None,
    fprs: Sequence[float] = (0.01, 0.05),
    bootstrap: int = 1000,
    seed: int = 0,
) -> MethodResult:
    """Every metric of one method on `volumes`.

    The 'chosen' threshold is the best-Dice threshold of `threshold_volumes` (a validation split),
    or, without them, of the other volumes of this split (leave one volume out). FPR thresholds
    come from the lesion-free slices of `threshold_volumes`, else of this split.
    """
    name = method.name
    scores, truth = _pooled(volumes, name)
    dice_best, threshold_best = best_dice(scores, truth)
    slice_dice = [per_slice_otsu_dice(v.scores[name], v.truth, v.slice_ids) for v in volumes]
    all_dice = [d for per in slice_dice for d in per.values()]
    if threshold_volumes:
        chosen = best_threshold(threshold_volumes, name)
        thresholds = [chosen] * len(volumes)
    elif len(volumes) > 1:
        thresholds = [best_threshold([w for j, w in enumerate(volumes) if j != i], name) for i in range(len(volumes))]
        chosen = float(np.median(thresholds))
    else:
        thresholds, chosen = [float("nan")], float("nan")
    reference = threshold_volumes or volumes
    healthy = np.concatenate([v.scores[name][v.healthy_voxels()] for v in reference])
    at_fpr, threshold_fpr = {}, {}
    for fpr in fprs:
        key = f"{fpr * 100:g}%"
        threshold_fpr[key] = threshold_at_fpr(healthy, fpr)
        at_fpr[key] = _dice_at(volumes, name, [threshold_fpr[key]] * len(volumes))
    slice_ids, maxima, means = [], [], []
    for v in volumes:
        ids, mx, mn = _slice_table(v, name)
        slice_ids.append(~np.isin(ids, v.healthy_slices))
        maxima.append(mx)
        means.append(mn)
    slice_labels = np.concatenate(slice_ids)
    ci = _bootstrap(volumes, name, slice_dice, bootstrap, seed)
    p_before = [v.p_healthy[name][0] for v in volumes if name in v.p_healthy]
    p_after = [v.p_healthy[name][1] for v in volumes if name in v.p_healthy]
    return MethodResult(
        method=name,
        description=method.describe(),
        regime=method.regime,
        auroc=auroc(scores, truth),
        auprc=auprc(scores, truth),
        dice_slice_otsu=float(np.mean(all_dice)) if all_dice else float("nan"),
        dice_chosen=_dice_at(volumes, name, thresholds),
        threshold_chosen=chosen,
        dice_best=dice_best,
        threshold_best=threshold_best,
        slice_auroc_max=auroc(np.concatenate(maxima), slice_labels),
        slice_auroc_mean=auroc(np.concatenate(means), slice_labels),
        dice_at_fpr=at_fpr,
        threshold_at_fpr=threshold_fpr,
        ci=ci,
        per_volume={v.subject: _volume_metrics(v, name, d) for v, d in zip(volumes, slice_dice, strict=True)},
        by_size=_size_metrics(volumes, name, slice_dice),
        p_healthy_before=float(np.mean(p_before)) if p_before else float("nan"),
        p_healthy_after=float(np.mean(p_after)) if p_after else float("nan"),
    )


def _bootstrap(
    volumes: Sequence[VolumeScores], name: str, slice_dice: list[dict[int, float]], n: int, seed: int
) -> dict[str, tuple[float, float]]:
    """Bootstrap over volumes: curve metrics from per-volume score histograms, Otsu Dice exactly."""
    scores = np.concatenate([v.scores[name] for v in volumes])
    edges = np.unique(np.quantile(scores, np.linspace(0, 1, HISTOGRAM_BINS + 1)))
    if len(edges) < 2:
        edges = np.array([scores.min(), scores.min() + 1.0])
    counts = [histogram_counts(v.scores[name], v.truth, edges) for v in volumes]

    def curve(metric: str) -> Callable[[np.ndarray], float]:
        def statistic(indices: np.ndarray) -> float:
            pos = np.sum([counts[i][0] for i in indices], axis=0)
            neg = np.sum([counts[i][1] for i in indices], axis=0)
            return counts_metrics(pos, neg)[metric]

        return statistic

    def otsu_dice(indices: np.ndarray) -> float:
        values = [d for i in indices for d in slice_dice[i].values()]
        return float(np.mean(values)) if values else float("nan")

    ci = {
        metric: bootstrap_interval(curve(metric), len(volumes), n, seed) for metric in ("auroc", "auprc", "dice_best")
    }
    ci["dice_slice_otsu"] = bootstrap_interval(otsu_dice, len(volumes), n, seed)
    return ci


def evaluate(
    volumes: Sequence[VolumeScores],
    methods: Sequence[Method],
    split: str,
    threshold_volumes: Sequence[VolumeScores] | None = None,
    fprs: Sequence[float] = (0.01, 0.05),
    bootstrap: int = 1000,
    median_size: int = 0,
    seed: int = 0,
    threshold_split: str | None = None,
) -> EvaluationReport:
    """Every method on the scored volumes of a split (see `evaluate_method`)."""
    if not volumes:
        raise InputError(f"no volumes with lesion masks in the {split} split")
    if threshold_volumes:
        source = f"best Dice on the {threshold_split or 'threshold'} split"
    elif len(volumes) > 1:
        source = "best Dice on the other volumes (leave one volume out)"
    else:
        source = "none (one volume and no threshold split)"
    results = tuple(evaluate_method(volumes, m, threshold_volumes, fprs, bootstrap, seed) for m in methods)
    pathological = sum(len(np.setdiff1d(np.unique(v.slice_ids), v.healthy_slices)) for v in volumes)
    return EvaluationReport(
        split=split,
        subjects=tuple(v.subject for v in volumes),
        lesion_voxels=int(sum(v.truth.sum() for v in volumes)),
        voxels=int(sum(v.truth.size for v in volumes)),
        pathological_slices=int(pathological),
        healthy_slices=int(sum(len(v.healthy_slices) for v in volumes)),
        threshold_source=source,
        median_filter=median_size,
        bootstrap=bootstrap,
        results=results,
    )
