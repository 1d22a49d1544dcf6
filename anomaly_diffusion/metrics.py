"""Voxel-level detection metrics of anomaly maps against ground-truth masks.

Scores are restricted to a foreground (brain) mask, as is standard, and pooled over all voxels
(not averaged per image). Curves and thresholds come from scikit-learn / scikit-image.
"""

from __future__ import annotations

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
    """Highest Dice over all thresholds (from the PR curve: Dice = 2PR / (P + R)) and its threshold."""
    if not truth.any():
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else float("nan")


def pixel_metrics(anomaly_map: np.ndarray, truth: np.ndarray, foreground: np.ndarray | None = None) -> PixelMetrics:
    """Pixel metrics of a map against a mask (same shape), inside `foreground` if given."""
    if anomaly_map.shape != truth.shape:
        raise ValueError(f"map shape {anomaly_map.shape} differs from mask shape {truth.shape}")
    keep = np.ones(truth.shape, bool) if foreground is None else foreground.astype(bool)
    scores, labels = anomaly_map[keep].astype(np.float64), truth[keep].astype(bool)
    both = labels.any() and not labels.all()
    auroc = float(roc_auc_score(labels, scores)) if both else float("nan")
    auprc = float(average_precision_score(labels, scores)) if both else float("nan")
    otsu = float(threshold_otsu(scores)) if np.ptp(scores) > 0 else float("inf")
    dice_best, threshold = best_dice(scores, labels)
    return PixelMetrics(
        auroc=auroc,
        auprc=auprc,
        dice_otsu=dice(scores > otsu, labels),
        dice_best=dice_best,
        threshold_best=threshold,
        lesion_voxels=int(labels.sum()),
        voxels=int(labels.size),
    )
