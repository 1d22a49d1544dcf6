"""The metrics of each method on a split, from the volumes' scores (thresholds: `thresholds.py`; intervals:
`bootstrap.py`).

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

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from anomaly_diffusion.errors import InputError
from anomaly_diffusion.evaluation.bootstrap import (
    PATIENT_METRICS,
    method_intervals,
    nanmean,
    patient_intervals,
    small_lesion_intervals,
)
from anomaly_diffusion.evaluation.methods import Method
from anomaly_diffusion.evaluation.postprocess import NO_POSTPROCESS, PostProcess
from anomaly_diffusion.evaluation.quality import QUALITY_METRICS
from anomaly_diffusion.evaluation.scoring import VolumeScores
from anomaly_diffusion.evaluation.thresholds import (
    binary_map,
    choose_thresholds,
    dice_at,
    pooled,
    sum_dice,
    valid_threshold,
    volume_counts,
)
from anomaly_diffusion.metrics import (
    auprc,
    auroc,
    best_dice,
    counts_dice,
    otsu_binary,
    per_slice_dice,
    size_bin,
    slice_scores,
    threshold_at_fpr,
)


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
    scores, truth = pooled(volumes, name)
    slice_dice = [otsu_slice_dice(v, name, mc) for v in volumes]
    all_dice = [d for per in slice_dice for d in per.values()]
    chosen = choose_thresholds(volumes, name, threshold_volumes, mc)
    reference = threshold_volumes or volumes
    healthy = np.concatenate([v.scores[name][v.healthy_voxels()] for v in reference])
    at_fpr, threshold_fpr = {}, {}
    for fpr in fprs:
        key = f"{fpr * 100:g}%"
        threshold_fpr[key] = threshold_at_fpr(healthy, fpr)
        at_fpr[key] = dice_at(volumes, name, [threshold_fpr[key]] * len(volumes), mc)
    slice_labels, maxima, means = [], [], []
    for v in volumes:
        ids, mx, mn = _slice_table(v, name)
        slice_labels.append(~np.isin(ids, v.healthy_slices))
        maxima.append(mx)
        means.append(mn)
    chosen_counts = [
        volume_counts(v, name, t, mc) if valid_threshold(t) else None
        for v, t in zip(volumes, chosen.per_volume, strict=True)
    ]
    per_volume = {
        v.subject: _volume_metrics(v, name, d, c, chosen.table[i] if chosen.table is not None else None)
        for i, (v, d, c) in enumerate(zip(volumes, slice_dice, chosen_counts, strict=True))
    }
    per_patient = {k: nanmean([m[k] for m in per_volume.values()]) for k in PATIENT_METRICS}
    ci = method_intervals(volumes, name, slice_dice, bootstrap, seed, chosen, chosen_counts, (maxima, slice_labels))
    ci.update(patient_intervals(list(per_volume.values()), bootstrap, seed))
    ci.update(small_lesion_intervals(volumes, name, slice_dice, bootstrap, seed))
    p_before = [v.p_healthy[name][0] for v in volumes if name in v.p_healthy]
    p_after = [v.p_healthy[name][1] for v in volumes if name in v.p_healthy]
    return MethodResult(
        method=name,
        description=method.describe(),
        regime=method.regime,
        auroc=auroc(scores, truth),
        auprc=auprc(scores, truth),
        dice_slice_otsu=float(np.mean(all_dice)) if all_dice else float("nan"),
        dice_chosen=sum_dice(chosen_counts),
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
    return {k: nanmean([q[k] for q in measured]) for k in QUALITY_METRICS} if measured else {}


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
        at_chosen = sum_dice([chosen_counts])
        volume_best = float(counts_dice(table).max())
        volume_best = max(volume_best, at_chosen) if np.isfinite(at_chosen) else volume_best
    else:
        volume_best = float("nan")
    return {
        "auroc": auroc(scores, truth),
        "auprc": auprc(scores, truth),
        "dice_best": volume_best,
        "dice_slice_otsu": float(np.mean(list(otsu_dice.values()))) if otsu_dice else float("nan"),
        "dice_chosen": sum_dice([chosen_counts]),
        "slice_auroc_max": auroc(maxima, labels),
        "lesion_voxels": float(truth.sum()),
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
