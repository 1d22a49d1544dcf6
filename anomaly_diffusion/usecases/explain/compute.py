"""The computing part of an explanation, with no file written: scan + model + settings -> the maps,
the anomaly-volume threshold and the run's metrics (against a lesion mask too, beside raw intensity)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from anomaly_diffusion.counterfactual.scan import ScanEnsemble, explain_scan_ensemble
from anomaly_diffusion.data.io import Scan
from anomaly_diffusion.data.transforms import PreprocessState, explained_region, normalise
from anomaly_diffusion.metrics import PixelMetrics, otsu, pixel_metrics
from anomaly_diffusion.scans import ScanExplanation
from anomaly_diffusion.usecases.explain.explainer import Explainer


@dataclass(frozen=True)
class StudyResult:
    """One scan explained, nothing written yet.

    Attributes:
        ensemble: the (mean) explanation on the input's grid and the members' spread.
        threshold: the anomaly-volume threshold (the explainer's, else Otsu on this scan's map).
        metrics: p(healthy), the map's maximum, mean, peak slice and volume above the threshold,
            the ensemble's spread, and against a given mask pixel metrics of the map and of raw intensity.
        pixel, baseline: the map's and raw intensity's pixel metrics against the mask (None without one).
    """

    ensemble: ScanEnsemble
    threshold: float
    metrics: dict[str, float]
    pixel: PixelMetrics | None
    baseline: PixelMetrics | None

    @property
    def explanation(self) -> ScanExplanation:
        return self.ensemble.explanation


def compute_study(
    explainer: Explainer,
    scan: Scan,
    truth: np.ndarray | None = None,
    brain: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StudyResult:
    """Explain `scan` with every member of the explainer's ensemble; threshold and metrics on the voxels
    explained (the foreground inside the explained slices), where map and intensity are scored alike."""
    bundle = explainer.bundle
    ensemble = explain_scan_ensemble(bundle, scan, explainer.plans, brainmask=brain, progress=progress)
    explanation = ensemble.explanation
    slices = explanation.slices
    region = explained_region(explanation.state) & explanation.foreground
    scores = explanation.anomaly_map[region]
    threshold = explainer.threshold
    if threshold is None:
        threshold = otsu(scores)
    # a classifier-free model has no classifier: no p(healthy) to report
    metrics = (
        {
            "p_healthy_before_mean": float(slices.p_healthy_before.mean()),
            "p_healthy_after_mean": float(slices.p_healthy_after.mean()),
            "p_healthy_before_min": float(slices.p_healthy_before.min()),
            "p_healthy_after_min": float(slices.p_healthy_after.min()),
        }
        if bundle.classifier is not None
        else {}
    )
    metrics |= {
        "anomaly_max": float(explanation.anomaly_map.max()),
        "anomaly_mean": float(slices.anomaly_map.mean()),
        "anomaly_peak_slice": peak_slice(explanation.anomaly_map, explanation.state),
        "slices_explained": float(len(explanation.state.kept)),
        "anomaly_threshold": threshold,
        "anomaly_volume_ml": float((explanation.anomaly_map > threshold).sum()) * scan.voxel_volume_ml,
        "ensemble_members": float(ensemble.members),
    }
    if ensemble.members > 1:
        spread = ensemble.uncertainty[region]
        metrics["uncertainty_mean"] = float(spread.mean()) if spread.size else 0.0
        metrics["uncertainty_max"] = float(spread.max()) if spread.size else 0.0
    pixel = baseline = None
    if truth is not None:
        # both detectors are scored on the same voxels: foreground inside the explained slices
        intensity = normalise(scan.data, explanation.state, bundle.config.data)[0]
        pixel = pixel_metrics(explanation.anomaly_map, truth, region)
        baseline = pixel_metrics(intensity, truth, region)
        metrics.update({f"pixel_{k}": v for k, v in pixel.as_dict().items()})
        metrics.update({f"intensity_baseline_{k}": v for k, v in baseline.as_dict().items()})
    return StudyResult(ensemble, threshold, metrics, pixel, baseline)


def peak_slice(anomaly_map: np.ndarray, state: PreprocessState) -> float:
    """The input-grid index of the slice holding the map's maximum, along the input axis that is sliced.

    Args:
        anomaly_map: (X, Y, Z) on the input grid.
        state: how the scan was sliced.

    Returns:
        The 0-based index (as a float, for MLflow), NaN for a map without any positive score.
    """
    if not anomaly_map.size or float(anomaly_map.max()) <= 0:
        return float("nan")
    voxel = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    through = next(i for i in range(3) if int(state.to_canonical[i, 0]) == state.slice_axis)
    return float(voxel[through])
