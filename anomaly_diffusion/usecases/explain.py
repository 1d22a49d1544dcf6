"""`adiff explain`: one scan's healthy counterfactual and anomaly map, written in its space and tracked."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from skimage.filters import threshold_otsu

from anomaly_diffusion.config import override_explain
from anomaly_diffusion.counterfactual.scan import explain_scan_ensemble
from anomaly_diffusion.counterfactual.settings import ExplainSettings, explain_settings
from anomaly_diffusion.data.dicom import redact
from anomaly_diffusion.data.dicom_out import plan_dicom_outputs, write_dicom_outputs
from anomaly_diffusion.data.io import Scan, check_input_kind, check_writable, load_scan, read_mask, save_like
from anomaly_diffusion.data.transforms import PreprocessState, explained_region, normalise
from anomaly_diffusion.diffusion.decoding import NEEDS_MASK
from anomaly_diffusion.diffusion.encoding import ENCODINGS, is_stochastic
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.files import atomic_write_bytes
from anomaly_diffusion.metrics import PixelMetrics, pixel_metrics
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.plots import SliceViews, explain_montage, slice_views
from anomaly_diffusion.runtime import compute_summary, model_device, precision_name, prepare_for_inference
from anomaly_diffusion.scans import InputPlanes, ScanExplanation, input_planes
from anomaly_diffusion.tracking import tracked_run
from anomaly_diffusion.usecases.common import load_model, output_stem

REVIEW_SLICES = 200
"""Default cap on the slices logged for review: every explained slice of a brain MRI (BraTS: 130-145)."""
REVIEW_KEYS = ("review/1_input", "review/2_counterfactual", "review/3_map")
"""The run's image series, one per view, each stepped by the input's slice number (the UI sorts charts by key)."""


@dataclass(frozen=True, kw_only=True)
class ExplainOptions:
    """The model and method options of one explanation, or of every study of a cohort; None takes the
    model's `explain` default. Checked once here (the settings themselves by `explain_settings`).

    Attributes:
        model: a bundle file, `models:/NAME/VERSION` or `models:/NAME@ALIAS`; None: the newest bundle.
        noise_level, scale, steps, guidance, residual, batch_size: `explain_settings` overrides.
        threshold: anomaly-volume threshold (None: the model's, else Otsu on this scan).
        compile_networks, fp32: `runtime.prepare_for_inference` options.
        encoding: an `ENCODINGS` name (None: 'ddim'); decoding: a `DECODINGS` name (None: the model's).
        ensemble_levels: noise levels whose maps are averaged (replaces noise_level), as evaluate's L=100+200.
        draws: draws of a stochastic encoding averaged per level (seeds 0..draws-1), as evaluate's n=.
            An ensemble of more than one member also writes its per-voxel spread (`_uncertainty.nii.gz`).
        review_slices: at most this many explained slices are logged as per-slice review images
            (every k-th when there are more), 0 none.
        explain_overrides: `explain.KEY=VALUE` replacing the model's explain defaults before the
            options above (e.g. explain.pairing=reconstruction, explain.gate=0.5, explain.mask.threshold=0.3).
    """

    out_dir: Path
    tracking_uri: str
    model: Path | str | None = None
    noise_level: int | None = None
    scale: float | None = None
    steps: int | None = None
    guidance: str | None = None
    residual: str | None = None
    batch_size: int | None = None
    threshold: float | None = None
    overwrite: bool = False
    device: str = "auto"
    compile_networks: bool = False
    fp32: bool = False
    encoding: str | None = None
    decoding: str | None = None
    ensemble_levels: Sequence[int] = ()
    draws: int = 1
    review_slices: int = REVIEW_SLICES
    explain_overrides: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.ensemble_levels and self.noise_level is not None:
            raise ConfigError("--ensemble gives the noise levels: leave out --noise-level")
        if self.draws < 1:
            raise ConfigError(f"--draws must be >= 1, got {self.draws}")
        encoding = self.encoding or "ddim"
        if self.draws > 1 and encoding in ENCODINGS and not is_stochastic(encoding):
            stochastic = ", ".join(n for n in ENCODINGS.names() if is_stochastic(n))
            raise ConfigError(
                f"--draws > 1 needs a stochastic --encoding ({stochastic}); {encoding!r} is deterministic"
            )

    @property
    def members(self) -> int:
        """How many maps the explanation averages."""
        return max(len(self.ensemble_levels), 1) * self.draws


@dataclass(frozen=True, kw_only=True)
class ExplainRequest(ExplainOptions):
    """One scan to explain, with `ExplainOptions`.

    Attributes:
        scans: one NIfTI file or DICOM series folder per model channel.
        mask: a ground-truth lesion mask (adds Dice/AUPRC against it); brainmask: the foreground.
    """

    scans: Sequence[Path]
    mask: Path | None = None
    brainmask: Path | None = None


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


def parse_levels(text: str) -> tuple[int, ...]:
    """'100+200' (or 'L=100+200', evaluate's key) -> (100, 200); one-line error otherwise."""
    body = text.strip().removeprefix("L=")
    try:
        levels = tuple(int(part) for part in body.split("+"))
    except ValueError as exc:
        raise ConfigError(f"--ensemble must be noise levels joined by '+', e.g. 100+200, got {text!r}") from exc
    return levels


@dataclass(frozen=True)
class Explainer:
    """A model loaded (once per process) with the settings it explains every scan with.

    Attributes:
        bundle: the networks, prepared for inference.
        plans: the settings of each ensemble member (one for a plain explanation): L, s, K, guidance,
            residual, encoding and its draw, decoding, batch size, precision.
        bundle_name: the bundle's file name; model_ref: 'NAME/VERSION' of a registered model.
        identity: what names this model across runs (registered version, training run, or file).
        threshold: the anomaly-volume threshold (the request's, else the model's); None: Otsu per scan.
    """

    bundle: ModelBundle
    plans: tuple[ExplainSettings, ...]
    bundle_name: str
    model_ref: str | None
    identity: str
    threshold: float | None

    @property
    def settings(self) -> ExplainSettings:
        """The first member's settings (what the others share but L and the draw)."""
        return self.plans[0]

    @property
    def precision(self) -> str:
        return precision_name(model_device(self.bundle), self.settings.amp)

    @property
    def compute(self) -> str:
        """The device, threads and precision, for the line printed before the work starts."""
        return f"compute: {compute_summary(model_device(self.bundle), self.settings.amp)}"

    def tags(self) -> dict[str, str]:
        """MLflow tags linking a run to the model's training run and registered version."""
        tags = {"adiff.train_run_id": self.bundle.train_run_id} if self.bundle.train_run_id else {}
        if self.model_ref:
            tags["adiff.model"] = self.model_ref
        return tags


def load_explainer(options: ExplainOptions, announce: Callable[[str], None] | None = None) -> Explainer:
    """Load the model of `options` (None: the newest bundle, said to `announce`) and check its explain settings once."""
    o = options
    bundle, bundle_name, model_ref = load_model(o.model, o.tracking_uri, o.device, announce)
    if o.explain_overrides:
        bundle = replace(bundle, config=override_explain(bundle.config, list(o.explain_overrides)))
    bundle = prepare_for_inference(bundle, o.compile_networks or bundle.config.explain.compile, o.fp32)
    plans = tuple(
        explain_settings(
            bundle,
            noise_level=level,
            steps=o.steps,
            scale=o.scale,
            guidance=o.guidance,
            residual=o.residual,
            batch_size=o.batch_size,
            encoding=o.encoding or "ddim",
            seed=draw,
            decoding=o.decoding,
        )
        for level in (list(o.ensemble_levels) if o.ensemble_levels else [o.noise_level])
        for draw in range(o.draws)
    )
    identity = model_ref or bundle.train_run_id or (str(Path(o.model).resolve()) if o.model else bundle_name)
    threshold = o.threshold if o.threshold is not None else bundle.config.explain.threshold
    return Explainer(bundle, plans, bundle_name, model_ref, identity, threshold)


@dataclass(frozen=True)
class StudyReview:
    """The per-slice review images of one study, for its MLflow run.

    Attributes:
        images: (slice number in the input, (input, counterfactual, map overlay)) per logged slice: the
            grey views as (H, W) uint8, the overlay (H, W, 3).
        explained: how many slices were explained; cap: the most that are logged; montage: its file name.
    """

    images: list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]
    explained: int
    cap: int
    montage: str


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


def _output_paths(stems: Sequence[str], out_dir: Path, ensemble: bool = False) -> dict[str, Path]:
    stem = stems[0]
    return {
        "anomaly_map": out_dir / f"{stem}_anomaly_map.nii.gz",
        **({"uncertainty": out_dir / f"{stem}_uncertainty.nii.gz"} if ensemble else {}),
        **{f"healthy_{c}" if c else "healthy": out_dir / f"{s}_healthy.nii.gz" for c, s in enumerate(stems)},
        "montage": out_dir / f"{stem}_montage.png",
        "summary": out_dir / f"{stem}_explain.json",
    }


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
    stems = [_public_stem(p, c, scan, private) for c, p in enumerate(scans)]
    dicom = plan_dicom_outputs(scan, out_dir, stems)
    outputs = {**_output_paths(stems, out_dir, len(plans) > 1), **dicom.paths}
    for path in outputs.values():
        check_writable(path, overwrite)
    if announce is not None:
        if compute:
            announce(explainer.compute)
        if dicom.note:
            announce(dicom.note)
    ensemble = explain_scan_ensemble(bundle, scan, plans, brainmask=brain, progress=progress)
    explanation = ensemble.explanation
    slices = explanation.slices
    region = explained_region(explanation.state) & explanation.foreground
    scores = explanation.anomaly_map[region]
    threshold = explainer.threshold
    if threshold is None:
        threshold = float(threshold_otsu(scores)) if scores.size and np.ptp(scores) > 0 else float("inf")
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
    if "uncertainty" in outputs:
        spread = ensemble.uncertainty[region]
        metrics["uncertainty_mean"] = float(spread.mean()) if spread.size else 0.0
        metrics["uncertainty_max"] = float(spread.max()) if spread.size else 0.0
    pixel = baseline = None
    if truth is not None:
        # both detectors are scored on the same voxels: foreground inside the explained slices
        intensity = normalise(scan.data, explanation.state, cfg.data)[0]
        pixel = pixel_metrics(explanation.anomaly_map, truth, region)
        baseline = pixel_metrics(intensity, truth, region)
        metrics.update({f"pixel_{k}": v for k, v in pixel.as_dict().items()})
        metrics.update({f"intensity_baseline_{k}": v for k, v in baseline.as_dict().items()})
    save_like(explanation.anomaly_map, scan, outputs["anomaly_map"])
    if "uncertainty" in outputs:
        save_like(ensemble.uncertainty, scan, outputs["uncertainty"])
    for c in range(len(scans)):
        save_like(explanation.healthy[c], scan, outputs[f"healthy_{c}" if c else "healthy"])
    planes = input_planes(scan, explanation, cfg.data, truth)
    vmax = metrics["anomaly_max"]
    peaks = planes.anomaly_map[..., planes.kept].max(axis=(0, 1))
    rows = np.sort(planes.kept[np.argsort(-peaks, kind="stable")[: cfg.explain.montage_slices]])
    explain_montage([(int(planes.numbers[k]), _views(planes, k, vmax)) for k in rows], vmax, outputs["montage"])
    chosen = review_selection(planes.kept, review_slices)
    review = StudyReview(
        images=[(int(planes.numbers[k]), _review_images(planes, int(k), vmax)) for k in chosen],
        explained=len(planes.kept),
        cap=review_slices,
        montage=outputs["montage"].name,
    )
    write_dicom_outputs(scan, explanation.anomaly_map, explanation.healthy, threshold, dicom)
    params = _params(scans, explainer) | _ensemble_params(plans)
    params = {k: redact(v, private) if isinstance(v, str) else v for k, v in params.items()}
    listed = {k: redact(str(v), private) for k, v in outputs.items()}
    summary = {"params": params, "metrics": metrics, "outputs": listed}
    atomic_write_bytes(json.dumps(summary, indent=2).encode(), outputs["summary"])
    return StudyExplanation(
        stems[0], outputs, tuple(dicom.paths), tuple(private), params, metrics, pixel, baseline, explanation, review
    )


def track_study(
    uri: str,
    explainer: Explainer,
    run_name: str,
    params: dict[str, object],
    metrics: dict[str, float],
    logged: dict[str, Path],
    tags: dict[str, str] | None = None,
    started_at: float | None = None,
    review: StudyReview | None = None,
) -> str:
    """Log an explained scan's params, metrics and files (`logged`: never the DICOM outputs) as one MLflow
    run; returns its id."""
    with tracked_run(
        uri,
        explainer.bundle.config.tracking.experiment,
        run_name,
        "explain",
        {**explainer.tags(), **(tags or {})},
        started_at=started_at,
    ) as run:
        run.log_params(params)
        run.log_metrics(metrics)
        for path in logged.values():
            run.log_artifact(path, "explain")
        text = _run_description(params, metrics)
        run.log_text(text, "README.md")
        head, tail = "", ""
        if review is not None:
            for number, images in review.images:
                for key, image in zip(REVIEW_KEYS, images, strict=True):
                    run.log_image(image, key, step=number)
            numbers = np.array([n for n, _ in review.images], dtype=int)
            head, tail = _review_pointer(run.run_id, numbers, review.explained, review.cap, review.montage)
        run.set_tags({"mlflow.note.content": f"{head}{text}{tail}"})
    return run.run_id


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


def _public_stem(path: Path, channel: int, scan: Scan, private: Sequence[str]) -> str:
    """The output stem of input `channel`, or for a name holding a DICOM patient identifier (a
    folder named after the patient) one made from its SeriesInstanceUID: file names reach MLflow."""
    stem = output_stem(path)
    if redact(stem, private) == stem:
        return stem
    source = scan.dicom[channel] if channel < len(scan.dicom) else None
    uid = str(source.datasets[0].get("SeriesInstanceUID", "")) if source is not None else str(path)
    return f"series-{hashlib.sha256(uid.encode()).hexdigest()[:10]}"


def review_selection(kept: np.ndarray, cap: int) -> np.ndarray:
    """The explained slices to log for review: all of `kept`, every k-th (k = ceil(n / cap)) when there
    are more than `cap`, none for cap 0."""
    if cap <= 0:
        return kept[:0]
    return kept[:: max(1, -(-kept.size // cap))]


def _review_images(planes: InputPlanes, k: int, vmax: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slice k's review images: the grey views as one channel (a third of the bytes to encode and store)."""
    views = _views(planes, k, vmax)
    return views.input[..., 0], views.healthy[..., 0], views.overlay


def _views(planes: InputPlanes, k: int, vmax: float) -> SliceViews:
    """Canonical slice k of `planes` as the three review images."""
    truth = planes.truth[..., k] if planes.truth is not None else None
    return slice_views(planes.image[..., k], planes.healthy[..., k], planes.anomaly_map[..., k], vmax, truth)


def _review_pointer(run_id: str, numbers: np.ndarray, explained: int, cap: int, montage: str) -> tuple[str, str]:
    """The run description's parts (markdown) that send a reviewer to the per-slice images (first, as
    the run page folds long descriptions) and show the montage (last)."""
    source = f"get-artifact?path={quote(f'explain/{montage}')}&run_uuid={run_id}"
    shown = f"\n\nThe most anomalous slices (`explain/{montage}`):\n\n![montage]({source})"
    if numbers.size == 0:
        return "", shown
    every = "" if numbers.size == explained else f" (one in {-(-explained // cap)} of {explained})"
    review = (
        f"**Slice review**: tab *Model metrics*, section *review*: input, healthy counterfactual and map for "
        f"{numbers.size} explained slices{every}, the step being the slice number in the input file "
        f"({int(numbers.min())} to {int(numbers.max())}). "
        + ("The charts open at step 0, before the first: " if numbers.min() > 0 else "")
        + "move a slider or type a slice number; click an image for full size.\n\n"
    )
    return review, shown


def _params(scans: Sequence[Path], explainer: Explainer) -> dict[str, object]:
    settings, bundle = explainer.settings, explainer.bundle
    return {
        "noise_level": settings.noise_level,
        "scale": settings.scale,
        "steps": settings.grid.steps,
        "residual": settings.residual,
        "guidance": settings.guidance,
        "batch_size": settings.batch_size,
        "precision": explainer.precision,
        "threads": torch.get_num_threads(),
        "inputs": ";".join(p.name for p in scans),
        "checkpoint": explainer.bundle_name,
        "model": explainer.model_ref or "",
        "bundle_version": bundle.package_version,
        **_method_params(bundle, settings),
    }


def _method_params(bundle: ModelBundle, settings: ExplainSettings) -> dict[str, object]:
    """How the map was guided: the method; for classifier-free guidance w, label dropout and inversion label."""
    cfg = bundle.config
    if cfg.method != "classifier_free":
        return {"method": cfg.method, "classifier_pooling": cfg.classifier.pooling}
    return {
        "method": cfg.method,
        "cfg_weight": settings.scale,
        "cfg_label_dropout": cfg.cfg.label_dropout,
        "encode_label": settings.encode_label,
    }


def counterfactual_params(settings: ExplainSettings) -> dict[str, object]:
    """The map's pairing and channel, the gradient smoothing and the mask, where they differ from the paper's."""
    params: dict[str, object] = {}
    if settings.pairing != "input":
        params["pairing"] = settings.pairing
    if settings.residual_channel is not None:
        params["residual_channel"] = settings.residual_channel
    if settings.smooth > 0 and settings.scale > 0:
        params["smooth"] = settings.smooth
    if settings.gate > 0:
        params["gate"] = settings.gate
    if settings.decoding in NEEDS_MASK:
        m = settings.mask
        params.update({"mask_threshold": m.threshold, "mask_dilation": m.dilation, "mask_sigma": m.sigma})
    return params


def _ensemble_params(plans: Sequence[ExplainSettings]) -> dict[str, object]:
    """The encoding, decoding and ensemble of an explanation, as run parameters."""
    first = plans[0]
    params: dict[str, object] = {"encoding": first.encoding, "decoding": first.decoding}
    if first.encoding in ("coarse", "simplex"):
        params["noise_cell"] = first.noise_cell
    if first.decoding == "thor":
        h = first.harmonisation
        params.update(
            {"harmonise_levels": h.levels, "harmonise_threshold": h.threshold, "harmonise_dilation": h.dilation}
        )
        params["harmonise_soft"] = h.soft
    params.update(counterfactual_params(first))
    if len(plans) > 1:
        params["ensemble_levels"] = "+".join(str(level) for level in dict.fromkeys(p.noise_level for p in plans))
        params["ensemble_draws"] = len({p.seed for p in plans})
        params["ensemble_members"] = len(plans)
    return params


def _run_description(params: dict[str, object], metrics: dict[str, float]) -> str:
    if params["method"] == "classifier_free":
        guided = (
            f"classifier-free guidance towards healthy, w={params['scale']} (label dropout "
            f"{params['cfg_label_dropout']}, inversion with the {params['encode_label']} label)"
        )
        healthy = "- p(healthy): not available (a classifier-free model has no classifier)"
    else:
        guided = f"classifier guidance ({params['guidance']} target, {params['classifier_pooling']}-pooled classifier)"
        healthy = (
            f"- p(healthy) before: {metrics['p_healthy_before_mean']:.3f} (mean over slices), "
            f"after: {metrics['p_healthy_after_mean']:.3f}"
        )
    levels = params.get("ensemble_levels", params["noise_level"])
    lines = [
        f"Explained `{params['inputs']}` with L={levels}, s={params['scale']}, "
        f"K={params['steps']} DDIM steps; the map is made by {guided}, {params['residual']} residual; "
        f"{params['encoding']} encoding, {params['decoding']} decoding"
        + (", compared with the plain reconstruction of x_L" if params.get("pairing") == "reconstruction" else "")
        + ".",
        "",
        healthy,
        f"- max anomaly score: {metrics['anomaly_max']:.3f}; {metrics['anomaly_volume_ml']:.2f} mL above the "
        f"threshold {metrics['anomaly_threshold']:.3f}",
    ]
    if "ensemble_members" in params:
        lines.append(
            f"- ensemble of {params['ensemble_members']} maps (levels {levels}, {params['ensemble_draws']} draw(s) "
            f"each): the map is their mean; uncertainty (their standard deviation) mean "
            f"{metrics['uncertainty_mean']:.3f}, max {metrics['uncertainty_max']:.3f}"
        )
    if "pixel_auprc" in metrics:
        lines.append(
            f"- against the given mask: AUPRC {metrics['pixel_auprc']:.3f}, best Dice {metrics['pixel_dice_best']:.3f} "
            f"(raw intensity baseline: AUPRC {metrics['intensity_baseline_auprc']:.3f})"
        )
    return "\n".join(lines)
