"""Voxel-level detection metrics of anomaly maps against ground-truth masks.

Scores are restricted to a foreground (brain) mask, as is standard, and pooled over all voxels
(not averaged per image). Curves and thresholds come from scikit-learn / scikit-image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from skimage.filters import threshold_otsu
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


@dataclass(frozen=True)
class PixelMetrics:
    """AUROC, AUPRC, Dice at an Otsu threshold and the best achievable Dice, over foreground voxels.

    AUROC/AUPRC are NaN when the mask has no lesion or no normal voxel (undefined there).
    """

    auroc: float
    auprc: float
    dice_otsu: float
    dice_best: float
    threshold_best: float
    lesion_voxels: int
    voxels: int

    def as_dict(self) -> dict[str, float]:
        """Plain dict for logs and JSON."""
        return {k: float(v) for k, v in asdict(self).items()}


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice = 2|P & T| / (|P| + |T|); 1.0 when both are empty."""
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    total = int(prediction.sum() + truth.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & truth).sum()) / total


def best_dice(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Highest Dice over all thresholds (from the PR curve: Dice = 2PR / (P + R)) and its threshold.

    The threshold t is for the rule used everywhere here, `scores > t`: the PR curve's point flags
    scores >= its score s, so t is the float64 just below s (with tied top scores, `> s` would flag none).
    """
    if not truth.any():
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    if not len(thresholds):
        return float(f1[best]), float("nan")
    return float(f1[best]), float(np.nextafter(np.float64(thresholds[best]), -np.inf))


def pixel_metrics(anomaly_map: np.ndarray, truth: np.ndarray, foreground: np.ndarray | None = None) -> PixelMetrics:
    """Pixel metrics of a map against a mask (same shape), inside `foreground` if given."""
    if anomaly_map.shape != truth.shape:
        raise ValueError(f"map shape {anomaly_map.shape} differs from mask shape {truth.shape}")
    keep = np.ones(truth.shape, bool) if foreground is None else foreground.astype(bool)
    scores, labels = anomaly_map[keep].astype(np.float64), truth[keep].astype(bool)
    both = labels.any() and not labels.all()
    auroc = float(roc_auc_score(labels, scores)) if both else float("nan")
    auprc = float(average_precision_score(labels, scores)) if both else float("nan")
    dice_best, threshold = best_dice(scores, labels)
    return PixelMetrics(
        auroc=auroc,
        auprc=auprc,
        dice_otsu=dice(scores > otsu(scores), labels),
        dice_best=dice_best,
        threshold_best=threshold,
        lesion_voxels=int(labels.sum()),
        voxels=int(labels.size),
    )


def confusion(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(TP, FP, FN) of a boolean prediction against a boolean mask (same shape), as a (3,) int64 array."""
    return np.array([(predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()], np.int64)


def confusion_at(scores: np.ndarray, truth: np.ndarray, threshold: float) -> np.ndarray:
    """`confusion` of `scores > threshold` (compared in float64) against a boolean mask."""
    return confusion(np.asarray(scores, dtype=np.float64) > threshold, truth.astype(bool))


def counts_dice(counts: np.ndarray) -> np.ndarray:
    """Dice = 2TP / (2TP + FP + FN) of (..., 3) (TP, FP, FN) counts, elementwise; 1 where there is
    nothing to find and nothing found."""
    tp, fp, fn = (np.asarray(counts)[..., i].astype(np.float64) for i in range(3))
    total = 2 * tp + fp + fn
    return np.where(total > 0, 2 * tp / np.maximum(total, 1), 1.0)


def otsu(scores: np.ndarray) -> float:
    """Otsu's threshold of a set of scores (scikit-image, histogram in the scores' own float dtype); +inf when
    there are none or they are all equal (nothing detected). The one guard for a constant map."""
    scores = np.asarray(scores)
    return float(threshold_otsu(scores)) if scores.size and np.ptp(scores) > 0 else float("inf")


def _slice_groups(slice_ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(slice id, indices of its voxels) for every slice present, in increasing slice order."""
    order = np.argsort(slice_ids, kind="stable")
    ids, starts = np.unique(slice_ids[order], return_index=True)
    ends = [*starts[1:], len(order)]
    return [(int(k), order[a:b]) for k, a, b in zip(ids, starts, ends, strict=True)]


def per_slice_otsu_thresholds(scores: np.ndarray, slice_ids: np.ndarray) -> dict[int, float]:
    """The Otsu threshold of each slice's own scores (`otsu`; +inf for a constant slice). {slice id: threshold}."""
    return {k: otsu(scores[index].astype(np.float64)) for k, index in _slice_groups(slice_ids)}


def per_slice_dice(predicted: np.ndarray, truth: np.ndarray, slice_ids: np.ndarray) -> dict[int, float]:
    """Dice of every slice that holds lesion voxels. predicted, truth: (V,) bool; slice_ids: (V,). {slice id: Dice}."""
    truth = truth.astype(bool)
    return {k: dice(predicted[index], truth[index]) for k, index in _slice_groups(slice_ids) if truth[index].any()}


def per_slice_otsu_dice(scores: np.ndarray, truth: np.ndarray, slice_ids: np.ndarray) -> dict[int, float]:
    """Dice of every slice that holds lesion voxels, each at the Otsu threshold of its own scores.

    This is the protocol of Wolleb et al. 2022 (mean Dice over diseased slices). Slices without
    lesion voxels are left out: Dice is undefined for them (see `dice` for the empty case).

    Args:
        scores: (V,) voxel scores; truth: (V,) bool lesion mask; slice_ids: (V,) slice of each voxel.

    Returns:
        {slice id: Dice} for the slices with lesion voxels.
    """
    return per_slice_dice(otsu_binary(scores, slice_ids), truth, slice_ids)


def otsu_binary(scores: np.ndarray, slice_ids: np.ndarray, support: np.ndarray | None = None) -> np.ndarray:
    """(V,) bool: each voxel's score above the Otsu threshold of its own slice (`per_slice_otsu_thresholds`).

    With `support` ((V,) bool), thresholds come from the supported voxels only and only they can
    be flagged (e.g. inside an eroded brain mask, whose rim would otherwise be a mode of its own).
    """
    keep = np.ones(scores.shape, bool) if support is None else support.astype(bool)
    thresholds = per_slice_otsu_thresholds(scores[keep], slice_ids[keep])
    if not thresholds:
        return np.zeros(scores.shape, bool)
    ids = np.array(sorted(thresholds), dtype=np.int64)
    values = np.array([thresholds[k] for k in ids.tolist()], dtype=np.float64)
    position = np.clip(np.searchsorted(ids, slice_ids), 0, len(ids) - 1)
    known = ids[position] == slice_ids
    return keep & known & (scores > np.where(known, values[position], np.inf))


def threshold_at_fpr(healthy_scores: np.ndarray, fpr: float) -> float:
    """The threshold that flags at most a fraction `fpr` of healthy voxels (scores > threshold).

    Set from voxels of lesion-free slices only, so it needs no voxel-level labels. NaN without any.
    """
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    if healthy_scores.size == 0:
        return float("nan")
    return float(np.quantile(np.asarray(healthy_scores, dtype=np.float64), 1 - fpr, method="higher"))


def slice_scores(scores: np.ndarray, slice_ids: np.ndarray, reduce: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """One score per slice: the max or the mean of its voxel scores. Returns (slice ids, scores)."""
    ids, inverse = np.unique(slice_ids, return_inverse=True)
    if reduce == "max":
        values = np.full(len(ids), -np.inf)
        np.maximum.at(values, inverse, scores)
    elif reduce == "mean":
        values = np.bincount(inverse, weights=scores, minlength=len(ids)) / np.bincount(inverse, minlength=len(ids))
    else:
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    return ids, values


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (scikit-learn); NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    return float(roc_auc_score(labels, scores)) if labels.any() and not labels.all() else float("nan")


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (scikit-learn's step-wise area under the PR curve); NaN without both classes."""
    labels = np.asarray(labels).astype(bool)
    return float(average_precision_score(labels, scores)) if labels.any() and not labels.all() else float("nan")


def histogram_counts(scores: np.ndarray, truth: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lesion and normal voxel counts per score bin (bins are [edges[i], edges[i+1]), last closed).

    Summing these over volumes gives the pooled curve of any set of volumes, which makes a
    bootstrap over volumes cheap (`counts_metrics`).
    """
    index = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 2)
    truth = truth.astype(bool)
    bins = len(edges) - 1
    return np.bincount(index[truth], minlength=bins), np.bincount(index[~truth], minlength=bins)


def counts_metrics(positives: np.ndarray, negatives: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC (average precision) and best Dice from binned counts (`histogram_counts`).

    Thresholds sit between bins; voxels in one bin are ties. With one bin per distinct score this
    equals scikit-learn's `roc_auc_score` and `average_precision_score`.
    """
    pos, neg = positives[::-1].astype(np.float64), negatives[::-1].astype(np.float64)  # high scores first
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return {"auroc": float("nan"), "auprc": float("nan"), "dice_best": float("nan")}
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    tpr, fpr = tp / n_pos, fp / n_neg
    auroc_value = float(np.sum((fpr - np.r_[0.0, fpr[:-1]]) * (tpr + np.r_[0.0, tpr[:-1]]) / 2))
    precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=(tp + fp) > 0)
    auprc_value = float(np.sum((tpr - np.r_[0.0, tpr[:-1]]) * precision))
    dice_best = float(np.max(2 * tp / (2 * tp + fp + (n_pos - tp))))
    return {"auroc": auroc_value, "auprc": auprc_value, "dice_best": dice_best}


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float], n_items: int, n_resamples: int, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(indices)` over items (volumes) drawn with replacement.

    Returns (NaN, NaN) with fewer than 2 items or no resamples.
    """
    if n_items < 2 or n_resamples < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n_items, n_items)) for _ in range(n_resamples)], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


SIZE_BINS_MM2 = (("small", 0.0, 100.0), ("medium", 100.0, 1000.0), ("large", 1000.0, float("inf")))
"""Lesion area per slice: small < 1 cm^2 <= medium < 10 cm^2 <= large."""


def size_bin(area_mm2: float) -> str:
    """The name of the size bin of a slice's lesion area (in mm^2)."""
    for name, low, high in SIZE_BINS_MM2:
        if low <= area_mm2 < high:
            return name
    raise ValueError(f"lesion area must be >= 0, got {area_mm2}")
