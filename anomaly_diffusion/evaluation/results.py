"""The metrics of each method on a split, from the volumes' scores.

Pooled over all voxels of the split (never averaged per image unless stated): pixel AUROC/AUPRC,
Dice at per-slice Otsu thresholds (Wolleb 2022's protocol: mean over diseased slices), Dice at one
threshold chosen on other data (a validation split, else leave one volume out), the best
achievable Dice (oracle), Dice at thresholds set on lesion-free slices for a target false-positive
rate, slice-level detection AUROC, results by lesion size (small: < 1 cm^2 of lesion in the slice,
from the voxel spacing), per volume and their mean over patients (one volume per patient), and
percentile-bootstrap 95% intervals over volumes (patients) for each.

With `PostProcess.min_component` every binary map first loses its small 3D components; the best
Dice and the thresholds chosen on other data are then searched over `candidate_thresholds` (the
continuous metrics, AUROC and AUPRC, do not change with it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from anomaly_diffusion.errors import InputError
from anomaly_diffusion.evaluation.methods import Method
from anomaly_diffusion.evaluation.postprocess import (
    NO_POSTPROCESS,
    PostProcess,
    candidate_thresholds,
    drop_small_components,
)
from anomaly_diffusion.evaluation.quality import QUALITY_METRICS
from anomaly_diffusion.evaluation.scoring import VolumeScores
from anomaly_diffusion.metrics import (
    auprc,
    auroc,
    best_dice,
    bootstrap_interval,
    counts_metrics,
    histogram_counts,
    otsu_binary,
    per_slice_dice,
    size_bin,
    slice_scores,
    threshold_at_fpr,
)

HISTOGRAM_BINS = 4096
PATIENT_METRICS = ("auroc", "auprc", "dice_best", "dice_slice_otsu", "dice_chosen", "slice_auroc_max")
"""Per-volume metrics averaged over patients (`MethodResult.per_patient`)."""


@dataclass(frozen=True)
class MethodResult:
    """One method's numbers on a split (see the module docstring for each metric).

    `ci` holds percentile-bootstrap 95% intervals over volumes (keys: the metric's name;
    'patient.NAME' for `per_patient`'s; 'small.auroc', 'small.auprc' for the small-lesion slices);
    `per_volume` and `by_size` map a subject or a size bin to its metrics; `per_patient` holds the
    mean over volumes of each per-volume metric; `dice_at_fpr` maps a target FPR ('1%') to the
    Dice at the threshold set on lesion-free slices, `threshold_at_fpr` to that threshold.
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
    per_patient: dict[str, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)


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
    postprocess: str = "none"

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


def binary_map(v: VolumeScores, predicted: np.ndarray, min_component: int = 0) -> np.ndarray:
    """(V,) bool: a binary map of the scored voxels, none outside the eroded brain mask, without its 3D
    components of fewer than `min_component` voxels."""
    if v.eroded_out is not None:
        predicted = predicted & ~v.eroded_out
    if min_component <= 1:
        return predicted
    return v.from_grid(drop_small_components(v.to_grid(predicted, False), min_component))


def _counts(v: VolumeScores, method: str, threshold: float, min_component: int = 0) -> np.ndarray:
    """(TP, FP, FN) of `scores > threshold` (in float64), post-processed (`binary_map`), as a (3,) int64 array."""
    predicted = binary_map(v, v.scores[method].astype(np.float64) > threshold, min_component)
    truth = v.truth
    return np.array([(predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()], np.int64)


def _counts_dice(counts: np.ndarray) -> np.ndarray:
    """Dice of (..., 3) (TP, FP, FN) counts, elementwise (1 where there is nothing to find or found)."""
    tp, fp, fn = (counts[..., i].astype(np.float64) for i in range(3))
    total = 2 * tp + fp + fn
    return np.where(total > 0, 2 * tp / np.maximum(total, 1), 1.0)


def _valid(threshold: float) -> bool:
    return bool(np.isfinite(threshold) or np.isposinf(threshold))


def _dice_at(
    volumes: Sequence[VolumeScores], method: str, thresholds: Sequence[float], min_component: int = 0
) -> float:
    """Pooled Dice with one threshold per volume (NaN if any threshold is NaN)."""
    if not all(_valid(t) for t in thresholds):
        return float("nan")
    total = sum(_counts(v, method, t, min_component) for v, t in zip(volumes, thresholds, strict=True))
    return float(_counts_dice(np.asarray(total)))


def otsu_slice_dice(v: VolumeScores, method: str, min_component: int = 0) -> dict[int, float]:
    """Each diseased slice's Dice at its own Otsu threshold (Wolleb 2022), after `binary_map`'s components."""
    support = None if v.eroded_out is None else ~v.eroded_out
    predicted = binary_map(v, otsu_binary(v.scores[method], v.slice_ids, support), min_component)
    return per_slice_dice(predicted, v.truth, v.slice_ids)


def _slice_table(v: VolumeScores, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slice ids, max score, mean score) of the slices of one volume, and labels via healthy_slices."""
    ids, maxima = slice_scores(v.scores[method], v.slice_ids, "max")
    _, means = slice_scores(v.scores[method], v.slice_ids, "mean")
    return ids, maxima, means


def small_lesion_voxels(v: VolumeScores, slice_dice: dict[int, float]) -> np.ndarray:
    """(V,) bool: the voxels of the diseased slices whose lesion is 'small' (< 1 cm^2, `size_bin`)."""
    small = [k for k in slice_dice if size_bin(float(v.truth[v.slice_ids == k].sum()) * v.pixel_area_mm2) == "small"]
    return np.isin(v.slice_ids, small)


def _size_metrics(
    volumes: Sequence[VolumeScores], method: str, slice_dice: Sequence[dict[int, float]]
) -> dict[str, dict[str, float]]:
    """Per lesion-size bin: pooled AUROC/AUPRC over the voxels of the bin's diseased slices, mean Otsu Dice.

    `slice_dice` holds each volume's `otsu_slice_dice` for this method.
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


@dataclass(frozen=True)
class _Thresholds:
    """The 'chosen' thresholds of one method: one per evaluated volume, their summary, and the best Dice."""

    per_volume: list[float]
    chosen: float
    dice_best: float
    threshold_best: float
    table: np.ndarray | None  # (volumes, candidates, 3) counts with components dropped, else None


def _choose_thresholds(
    volumes: Sequence[VolumeScores],
    name: str,
    threshold_volumes: Sequence[VolumeScores] | None,
    min_component: int,
) -> _Thresholds:
    """Best-Dice thresholds from `threshold_volumes`, else leave one volume out; and the oracle Dice of `volumes`.

    Without component filtering both are exact (`best_dice`, over every threshold); with it they
    are searched over `candidate_thresholds` of the pooled scores.
    """
    scores, truth = _pooled(volumes, name)
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
        return _Thresholds(per_volume, chosen, dice_best, threshold_best, None)
    grid = candidate_thresholds(scores)
    table = np.stack([np.stack([_counts(v, name, t, min_component) for t in grid]) for v in volumes])
    if threshold_volumes:
        t_scores, t_truth = _pooled(threshold_volumes, name)
        t_grid = candidate_thresholds(t_scores)
        t_total = sum(np.stack([_counts(w, name, t, min_component) for t in t_grid]) for w in threshold_volumes)
        best = t_grid[int(np.argmax(_counts_dice(np.asarray(t_total))))] if t_truth.any() else float("nan")
        per_volume = [float(best)] * n
        chosen = float(best)
    elif n > 1:
        total = table.sum(axis=0)
        per_volume = []
        for i in range(n):
            others = total - table[i]
            has_lesion = others[0, 0] + others[0, 2] > 0  # TP + FN: the others' lesion voxels
            per_volume.append(float(grid[int(np.argmax(_counts_dice(others)))]) if has_lesion else float("nan"))
        chosen = float(np.median(per_volume))
    else:
        per_volume, chosen = [float("nan")], float("nan")
    dice_grid = _counts_dice(table.sum(axis=0))
    k = int(np.argmax(dice_grid))
    dice_best, threshold_best = float(dice_grid[k]), float(grid[k])
    if threshold_volumes and _valid(chosen):  # the chosen threshold is a candidate too: best >= chosen
        at_chosen = _dice_at(volumes, name, per_volume, min_component)
        if at_chosen > dice_best:
            dice_best, threshold_best = at_chosen, chosen
    if not truth.any():
        dice_best = threshold_best = float("nan")
    return _Thresholds(per_volume, chosen, dice_best, threshold_best, table)


def evaluate_method(
    volumes: Sequence[VolumeScores],
    method: Method,
    threshold_volumes: Sequence[VolumeScores] | None = None,
    fprs: Sequence[float] = (0.01, 0.05),
    bootstrap: int = 1000,
    seed: int = 0,
    postprocess: PostProcess = NO_POSTPROCESS,
) -> MethodResult:
    """Every metric of one method on `volumes`.

    The 'chosen' threshold is the best-Dice threshold of `threshold_volumes` (a validation split),
    or, without them, of the other volumes of this split (leave one volume out). FPR thresholds
    come from the lesion-free slices of `threshold_volumes`, else of this split. Binary maps
    lose their small components when `postprocess.min_component` is set (the maps themselves were
    filtered and eroded when they were scored).
    """
    name = method.name
    mc = postprocess.min_component
    scores, truth = _pooled(volumes, name)
    slice_dice = [otsu_slice_dice(v, name, mc) for v in volumes]
    all_dice = [d for per in slice_dice for d in per.values()]
    chosen = _choose_thresholds(volumes, name, threshold_volumes, mc)
    reference = threshold_volumes or volumes
    healthy = np.concatenate([v.scores[name][v.healthy_voxels()] for v in reference])
    at_fpr, threshold_fpr = {}, {}
    for fpr in fprs:
        key = f"{fpr * 100:g}%"
        threshold_fpr[key] = threshold_at_fpr(healthy, fpr)
        at_fpr[key] = _dice_at(volumes, name, [threshold_fpr[key]] * len(volumes), mc)
    slice_labels, maxima, means = [], [], []
    for v in volumes:
        ids, mx, mn = _slice_table(v, name)
        slice_labels.append(~np.isin(ids, v.healthy_slices))
        maxima.append(mx)
        means.append(mn)
    chosen_counts = [
        _counts(v, name, t, mc) if _valid(t) else None for v, t in zip(volumes, chosen.per_volume, strict=True)
    ]
    per_volume = {
        v.subject: _volume_metrics(v, name, d, c, chosen.table[i] if chosen.table is not None else None)
        for i, (v, d, c) in enumerate(zip(volumes, slice_dice, chosen_counts, strict=True))
    }
    per_patient = {k: _nanmean([m[k] for m in per_volume.values()]) for k in PATIENT_METRICS}
    ci = _bootstrap(volumes, name, slice_dice, bootstrap, seed, chosen, chosen_counts, (maxima, slice_labels))
    ci.update(_patient_bootstrap(list(per_volume.values()), bootstrap, seed))
    ci.update(_small_bootstrap(volumes, name, slice_dice, bootstrap, seed))
    p_before = [v.p_healthy[name][0] for v in volumes if name in v.p_healthy]
    p_after = [v.p_healthy[name][1] for v in volumes if name in v.p_healthy]
    return MethodResult(
        method=name,
        description=method.describe(),
        regime=method.regime,
        auroc=auroc(scores, truth),
        auprc=auprc(scores, truth),
        dice_slice_otsu=float(np.mean(all_dice)) if all_dice else float("nan"),
        dice_chosen=_sum_dice(chosen_counts),
        threshold_chosen=chosen.chosen,
        dice_best=chosen.dice_best,
        threshold_best=chosen.threshold_best,
        slice_auroc_max=auroc(np.concatenate(maxima), np.concatenate(slice_labels)),
        slice_auroc_mean=auroc(np.concatenate(means), np.concatenate(slice_labels)),
        dice_at_fpr=at_fpr,
        threshold_at_fpr=threshold_fpr,
        ci=ci,
        per_volume=per_volume,
        by_size=_size_metrics(volumes, name, slice_dice),
        p_healthy_before=float(np.mean(p_before)) if p_before else float("nan"),
        p_healthy_after=float(np.mean(p_after)) if p_after else float("nan"),
        per_patient=per_patient,
        quality=_mean_quality(volumes, name),
    )


def _mean_quality(volumes: Sequence[VolumeScores], name: str) -> dict[str, float]:
    """Each counterfactual-quality value's mean over the volumes; {} for a method without counterfactuals."""
    measured = [v.quality[name] for v in volumes if name in v.quality]
    return {k: _nanmean([q[k] for q in measured]) for k in QUALITY_METRICS} if measured else {}


def _nanmean(values: Sequence[float]) -> float:
    finite = [x for x in values if np.isfinite(x)]
    return float(np.mean(finite)) if finite else float("nan")


def _sum_dice(counts: Sequence[np.ndarray | None]) -> float:
    """Pooled Dice of per-volume (TP, FP, FN) counts; NaN if any volume has none (no valid threshold)."""
    if not counts or any(c is None for c in counts):
        return float("nan")
    return float(_counts_dice(np.sum([c for c in counts if c is not None], axis=0)))


def _volume_metrics(
    v: VolumeScores,
    method: str,
    otsu_dice: dict[int, float],
    chosen_counts: np.ndarray | None,
    table: np.ndarray | None,
) -> dict[str, float]:
    """One volume's metrics; `otsu_dice` is its `otsu_slice_dice`, `chosen_counts` its counts at its chosen
    threshold, `table` its (candidates, 3) counts when components are dropped (its best Dice is then over them)."""
    scores, truth = v.scores[method], v.truth
    ids, maxima, _ = _slice_table(v, method)
    labels = ~np.isin(ids, v.healthy_slices)
    if table is None:
        volume_best = best_dice(scores, truth)[0]
    elif truth.any():  # over the candidates and its chosen threshold, as the pooled best
        at_chosen = _sum_dice([chosen_counts])
        volume_best = float(_counts_dice(table).max())
        volume_best = max(volume_best, at_chosen) if np.isfinite(at_chosen) else volume_best
    else:
        volume_best = float("nan")
    return {
        "auroc": auroc(scores, truth),
        "auprc": auprc(scores, truth),
        "dice_best": volume_best,
        "dice_slice_otsu": float(np.mean(list(otsu_dice.values()))) if otsu_dice else float("nan"),
        "dice_chosen": _sum_dice([chosen_counts]),
        "slice_auroc_max": auroc(maxima, labels),
        "lesion_voxels": float(truth.sum()),
    }


def _histogram_edges(scores: np.ndarray) -> np.ndarray:
    edges = np.unique(np.quantile(scores, np.linspace(0, 1, HISTOGRAM_BINS + 1))) if scores.size else np.zeros(0)
    if len(edges) < 2:
        low = float(scores.min()) if scores.size else 0.0
        edges = np.array([low, low + 1.0])
    return edges


def _bootstrap(
    volumes: Sequence[VolumeScores],
    name: str,
    slice_dice: list[dict[int, float]],
    n: int,
    seed: int,
    chosen: _Thresholds,
    chosen_counts: Sequence[np.ndarray | None],
    slices: tuple[Sequence[np.ndarray], Sequence[np.ndarray]],
) -> dict[str, tuple[float, float]]:
    """Bootstrap over volumes: curve metrics from per-volume score histograms, the rest from per-volume parts."""
    edges = _histogram_edges(np.concatenate([v.scores[name] for v in volumes]))
    counts = [histogram_counts(v.scores[name], v.truth, edges) for v in volumes]

    def otsu_dice(indices: np.ndarray) -> float:
        values = [d for i in indices for d in slice_dice[i].values()]
        return float(np.mean(values)) if values else float("nan")

    def dice_chosen(indices: np.ndarray) -> float:
        return _sum_dice([chosen_counts[i] for i in indices])

    maxima, labels = slices

    def slice_auroc(indices: np.ndarray) -> float:
        return auroc(np.concatenate([maxima[i] for i in indices]), np.concatenate([labels[i] for i in indices]))

    ci = {
        metric: bootstrap_interval(_pooled_curve_metric(counts, metric), len(volumes), n, seed)
        for metric in ("auroc", "auprc")
    }
    if chosen.table is None:
        ci["dice_best"] = bootstrap_interval(_pooled_curve_metric(counts, "dice_best"), len(volumes), n, seed)
    else:
        table = chosen.table

        def best_over_candidates(indices: np.ndarray) -> float:
            total = table[indices].sum(axis=0)
            return float(_counts_dice(total).max()) if (total[0, 0] + total[0, 2]) > 0 else float("nan")

        ci["dice_best"] = bootstrap_interval(best_over_candidates, len(volumes), n, seed)
    ci["dice_slice_otsu"] = bootstrap_interval(otsu_dice, len(volumes), n, seed)
    ci["dice_chosen"] = bootstrap_interval(dice_chosen, len(volumes), n, seed)
    ci["slice_auroc_max"] = bootstrap_interval(slice_auroc, len(volumes), n, seed)
    return ci


def _pooled_curve_metric(counts: Sequence[tuple[np.ndarray, np.ndarray]], metric: str) -> Callable[[np.ndarray], float]:
    """A bootstrap statistic: `metric` (AUROC, AUPRC, best Dice) pooled over the volumes drawn (`indices`),
    from each volume's (positive, negative) score-histogram counts."""

    def statistic(indices: np.ndarray) -> float:
        pos = np.sum([counts[i][0] for i in indices], axis=0)
        neg = np.sum([counts[i][1] for i in indices], axis=0)
        return counts_metrics(pos, neg)[metric]

    return statistic


def _patient_bootstrap(per_volume: list[dict[str, float]], n: int, seed: int) -> dict[str, tuple[float, float]]:
    """Intervals of the mean over patients of each per-volume metric ('patient.NAME')."""
    values = {k: np.array([m[k] for m in per_volume], dtype=np.float64) for k in PATIENT_METRICS}

    def mean_of(metric: str) -> Callable[[np.ndarray], float]:
        return lambda indices: _nanmean(values[metric][indices].tolist())

    return {f"patient.{k}": bootstrap_interval(mean_of(k), len(per_volume), n, seed) for k in PATIENT_METRICS}


def _small_bootstrap(
    volumes: Sequence[VolumeScores], name: str, slice_dice: list[dict[int, float]], n: int, seed: int
) -> dict[str, tuple[float, float]]:
    """Intervals of the pooled AUROC/AUPRC over the voxels of slices with a small lesion (< 1 cm^2)."""
    masks = [small_lesion_voxels(v, d) for v, d in zip(volumes, slice_dice, strict=True)]
    chosen = [v.scores[name][m] for v, m in zip(volumes, masks, strict=True)]
    edges = _histogram_edges(np.concatenate(chosen))
    counts = [histogram_counts(s, v.truth[m], edges) for s, v, m in zip(chosen, volumes, masks, strict=True)]

    return {
        f"small.{metric}": bootstrap_interval(_pooled_curve_metric(counts, metric), len(volumes), n, seed)
        for metric in ("auroc", "auprc")
    }


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
    postprocess: PostProcess = NO_POSTPROCESS,
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
    results = tuple(evaluate_method(volumes, m, threshold_volumes, fprs, bootstrap, seed, postprocess) for m in methods)
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
        postprocess=postprocess.describe(),
    )
