"""`adiff explain` for one scan: read and check every input and output first, then compute, write,
and track; the cohort runs the same `explain_study` per study and tracks it itself."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anomaly_diffusion.data.dicom import redact
from anomaly_diffusion.data.dicom_out import plan_dicom_outputs
from anomaly_diffusion.data.io import check_input_kind, check_writable, load_scan, read_mask
from anomaly_diffusion.metrics import PixelMetrics
from anomaly_diffusion.scans import ScanExplanation
from anomaly_diffusion.usecases.explain.compute import compute_study
from anomaly_diffusion.usecases.explain.explainer import Explainer, ExplainRequest, load_explainer
from anomaly_diffusion.usecases.explain.params import explain_params
from anomaly_diffusion.usecases.explain.review import REVIEW_SLICES, StudyReview
from anomaly_diffusion.usecases.explain.track import track_study
from anomaly_diffusion.usecases.explain.write import output_paths, public_stem, write_study


@dataclass(frozen=True)
class ExplainOutcome:
    """Files and numbers of one explained scan."""

    run_id: str
    outputs: dict[str, Path]
    metrics: dict[str, float]
    pixel: PixelMetrics | None
    baseline: PixelMetrics | None
    seconds: float
    explanation: ScanExplanation = field(repr=False)


@dataclass(frozen=True)
class StudyExplanation:
    """One explained scan, its files written, not yet tracked.

    Attributes:
        stem: the outputs' stem (the first input's name, or one made from its SeriesInstanceUID when
            that name holds a patient identifier).
        outputs: every file (or DICOM folder) written.
        private: the keys of `outputs` that carry the patient's identifiers (DICOM outputs): never
            logged to MLflow.
        identifiers: the scan's DICOM patient identifiers (none for other formats), for `redact`.
    """

    stem: str
    outputs: dict[str, Path]
    private: tuple[str, ...]
    identifiers: tuple[str, ...]
    params: dict[str, object]
    metrics: dict[str, float]
    pixel: PixelMetrics | None
    baseline: PixelMetrics | None
    explanation: ScanExplanation = field(repr=False)
    review: StudyReview | None = field(default=None, repr=False)

    @property
    def logged(self) -> dict[str, Path]:
        """The outputs that may go to MLflow."""
        return {k: p for k, p in self.outputs.items() if k not in self.private}


def explain_study(
    explainer: Explainer,
    scans: Sequence[Path],
    out_dir: Path,
    mask: Path | None = None,
    brainmask: Path | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    announce: Callable[[str], None] | None = None,
    compute: bool = True,
    review_slices: int = REVIEW_SLICES,
) -> StudyExplanation:
    """Explain one scan with a loaded model: NIfTI maps, a montage, a JSON summary (and DICOM outputs for
    a DICOM input) in out_dir.

    Every input is read and checked, and every output checked writable, before any work; then
    `announce` is told what computes (unless `compute` is False: a cohort says it once) and why a
    DICOM input gets no DICOM outputs.
    """
    bundle, plans = explainer.bundle, explainer.plans
    cfg = bundle.config
    scan = load_scan(list(scans), expected_channels=cfg.data.image_channels)
    check_input_kind(scan, bundle.extra.get("trained_on"))
    truth = read_mask(mask, scan) if mask is not None else None
    brain = read_mask(brainmask, scan) if brainmask is not None else None
    private = scan.identifiers()  # DICOM patient identifiers: into the DICOM outputs only, never MLflow
    stems = [public_stem(p, c, scan, private) for c, p in enumerate(scans)]
    dicom = plan_dicom_outputs(scan, out_dir, stems)
    outputs = {**output_paths(stems, out_dir, len(plans) > 1), **dicom.paths}
    for path in outputs.values():
        check_writable(path, overwrite)
    if announce is not None:
        if compute:
            announce(explainer.compute)
        if dicom.note:
            announce(dicom.note)
    result = compute_study(explainer, scan, truth, brain, progress)
    params = {k: redact(v, private) if isinstance(v, str) else v for k, v in explain_params(scans, explainer).items()}
    review = write_study(
        scan, result, outputs, dicom, params, private, truth, cfg.data, cfg.explain.montage_slices, review_slices
    )
    return StudyExplanation(
        stems[0],
        outputs,
        tuple(dicom.paths),
        tuple(private),
        params,
        result.metrics,
        result.pixel,
        result.baseline,
        result.explanation,
        review,
    )


def run_explain(
    request: ExplainRequest,
    progress: Callable[[int, int], None] | None = None,
    announce: Callable[[str], None] | None = None,
) -> ExplainOutcome:
    """Explain one scan: NIfTI maps, a montage and a JSON summary, all tracked in one MLflow run.

    `announce` is told the device, threads and precision before the work starts.
    """
    started = time.perf_counter()
    started_at = time.time()
    r = request
    explainer = load_explainer(r, announce)
    study = explain_study(
        explainer,
        r.scans,
        r.out_dir,
        r.mask,
        r.brainmask,
        r.overwrite,
        progress,
        announce,
        review_slices=r.review_slices,
    )
    run_id = track_study(
        r.tracking_uri,
        explainer,
        f"explain-{study.stem}",
        study.params,
        study.metrics,
        study.logged,
        None,
        started_at,
        study.review,
    )
    return ExplainOutcome(
        run_id,
        study.outputs,
        study.metrics,
        study.pixel,
        study.baseline,
        time.perf_counter() - started,
        study.explanation,
    )
