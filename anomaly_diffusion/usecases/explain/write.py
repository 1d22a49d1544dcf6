"""The files of an explained scan, in the input's space: NIfTI maps and counterfactuals, the montage,
the JSON summary and, for a DICOM input, the DICOM outputs; output names that carry no identifier."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anomaly_diffusion.config import DataConfig
from anomaly_diffusion.data.dicom import redact
from anomaly_diffusion.data.dicom_out import DicomPlan, write_dicom_outputs
from anomaly_diffusion.data.io import Scan, save_like
from anomaly_diffusion.files import atomic_write_bytes
from anomaly_diffusion.plots import explain_montage
from anomaly_diffusion.scans import input_planes
from anomaly_diffusion.usecases.common import output_stem
from anomaly_diffusion.usecases.explain.compute import StudyResult
from anomaly_diffusion.usecases.explain.review import StudyReview, slice_views_of, study_review


def output_paths(stems: Sequence[str], out_dir: Path, ensemble: bool = False) -> dict[str, Path]:
    """The NIfTI, montage and summary files of a scan whose inputs have these stems."""
    stem = stems[0]
    return {
        "anomaly_map": out_dir / f"{stem}_anomaly_map.nii.gz",
        **({"uncertainty": out_dir / f"{stem}_uncertainty.nii.gz"} if ensemble else {}),
        **{f"healthy_{c}" if c else "healthy": out_dir / f"{s}_healthy.nii.gz" for c, s in enumerate(stems)},
        "montage": out_dir / f"{stem}_montage.png",
        "summary": out_dir / f"{stem}_explain.json",
    }


def write_study(
    scan: Scan,
    result: StudyResult,
    outputs: dict[str, Path],
    dicom: DicomPlan,
    params: dict[str, object],
    private: Sequence[str],
    truth: np.ndarray | None,
    data: DataConfig,
    montage_slices: int,
    review_slices: int,
) -> StudyReview:
    """Write every output of `outputs` (checked writable before the work) and the DICOM outputs; the
    JSON summary holds params, metrics and the outputs with patient identifiers redacted.

    Returns the review images of the explained slices (drawn here with the montage, from the same views).
    """
    explanation, metrics = result.explanation, result.metrics
    save_like(explanation.anomaly_map, scan, outputs["anomaly_map"])
    if "uncertainty" in outputs:
        save_like(result.ensemble.uncertainty, scan, outputs["uncertainty"])
    for c in range(explanation.healthy.shape[0]):
        save_like(explanation.healthy[c], scan, outputs[f"healthy_{c}" if c else "healthy"])
    planes = input_planes(scan, explanation, data, truth)
    vmax = metrics["anomaly_max"]
    peaks = planes.anomaly_map[..., planes.kept].max(axis=(0, 1))
    rows = np.sort(planes.kept[np.argsort(-peaks, kind="stable")[:montage_slices]])
    explain_montage([(int(planes.numbers[k]), slice_views_of(planes, k, vmax)) for k in rows], vmax, outputs["montage"])
    review = study_review(planes, vmax, review_slices, outputs["montage"].name)
    write_dicom_outputs(scan, explanation.anomaly_map, explanation.healthy, result.threshold, dicom)
    listed = {k: redact(str(v), private) for k, v in outputs.items()}
    summary = {"params": params, "metrics": metrics, "outputs": listed}
    atomic_write_bytes(json.dumps(summary, indent=2).encode(), outputs["summary"])
    return review


def public_stem(path: Path, channel: int, scan: Scan, private: Sequence[str]) -> str:
    """The output stem of input `channel`, or for a name holding a DICOM patient identifier (a
    folder named after the patient) one made from its SeriesInstanceUID: file names reach MLflow."""
    stem = output_stem(path)
    if redact(stem, private) == stem:
        return stem
    source = scan.dicom[channel] if channel < len(scan.dicom) else None
    uid = str(source.datasets[0].get("SeriesInstanceUID", "")) if source is not None else str(path)
    return f"series-{hashlib.sha256(uid.encode()).hexdigest()[:10]}"
