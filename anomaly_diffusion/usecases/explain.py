"""`adiff explain`: one scan's healthy counterfactual and anomaly map, written in its space and tracked."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from skimage.filters import threshold_otsu

from anomaly_diffusion.data.dicom import redact
from anomaly_diffusion.data.dicom_out import plan_dicom_outputs, write_dicom_outputs
from anomaly_diffusion.data.io import Scan, check_input_kind, check_writable, load_scan, read_mask, save_like
from anomaly_diffusion.data.transforms import explained_region, normalise
from anomaly_diffusion.explain import ExplainSettings, explain_scan, explain_settings
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


@dataclass(frozen=True)
class ExplainRequest:
    """What to explain and how; None takes the model's `explain` default.

    Attributes:
        scans: one NIfTI file or DICOM series folder per model channel.
        model: a bundle file, `models:/NAME/VERSION` or `models:/NAME@ALIAS`; None: the newest bundle.
        noise_level, scale, steps, guidance, residual, batch_size: `explain_settings` overrides.
        mask: a ground-truth lesion mask (adds Dice/AUPRC against it); brainmask: the foreground.
        threshold: anomaly-volume threshold (None: the model's, else Otsu on this scan).
        compile_networks, fp32: `runtime.prepare_for_inference` options.
        review_slices: at most this many explained slices are logged as per-slice review images
            (every k-th when there are more), 0 none.
    """

    scans: Sequence[Path]
    out_dir: Path
    tracking_uri: str
    model: Path | str | None = None
    noise_level: int | None = None
    scale: float | None = None
    steps: int | None = None
    guidance: str | None = None
    residual: str | None = None
    batch_size: int | None = None
    mask: Path | None = None
    brainmask: Path | None = None
    threshold: float | None = None
    overwrite: bool = False
    device: str = "auto"
    compile_networks: bool = False
    fp32: bool = False
    review_slices: int = REVIEW_SLICES


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


def _output_paths(stems: Sequence[str], out_dir: Path) -> dict[str, Path]:
    stem = stems[0]
    return {
        "anomaly_map": out_dir / f"{stem}_anomaly_map.nii.gz",
        **{f"healthy_{c}" if c else "healthy": out_dir / f"{s}_healthy.nii.gz" for c, s in enumerate(stems)},
        "montage": out_dir / f"{stem}_montage.png",
        "summary": out_dir / f"{stem}_explain.json",
    }


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
    bundle, bundle_name, model_ref = load_model(r.model, r.tracking_uri, r.device, announce)
    bundle = prepare_for_inference(bundle, r.compile_networks or bundle.config.explain.compile, r.fp32)
    cfg = bundle.config
    settings = explain_settings(
        bundle,
        noise_level=r.noise_level,
        steps=r.steps,
        scale=r.scale,
        guidance=r.guidance,
        residual=r.residual,
        batch_size=r.batch_size,
    )
    scan = load_scan(list(r.scans), expected_channels=cfg.data.image_channels)
    check_input_kind(scan, bundle.extra.get("trained_on"))
    truth = read_mask(r.mask, scan) if r.mask is not None else None
    brain = read_mask(r.brainmask, scan) if r.brainmask is not None else None
    private = scan.identifiers()  # DICOM patient identifiers: into the DICOM outputs only, never MLflow
    stems = [_public_stem(p, c, scan, private) for c, p in enumerate(r.scans)]
    dicom = plan_dicom_outputs(scan, r.out_dir, stems)
    outputs = {**_output_paths(stems, r.out_dir), **dicom.paths}
    for path in outputs.values():
        check_writable(path, r.overwrite)
    if announce is not None:
        announce(f"compute: {compute_summary(model_device(bundle), settings.amp)}")
        if dicom.note:
            announce(dicom.note)
    explanation = explain_scan(bundle, scan, settings, brainmask=brain, progress=progress)
    slices = explanation.slices
    region = explained_region(explanation.state) & explanation.foreground
    scores = explanation.anomaly_map[region]
    threshold = r.threshold if r.threshold is not None else cfg.explain.threshold
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
        "slices_explained": float(len(explanation.state.kept)),
        "anomaly_threshold": threshold,
        "anomaly_volume_ml": float((explanation.anomaly_map > threshold).sum()) * scan.voxel_volume_ml,
    }
    pixel = baseline = None
    if truth is not None:
        # both detectors are scored on the same voxels: foreground inside the explained slices
        intensity = normalise(scan.data, explanation.state, cfg.data)[0]
        pixel = pixel_metrics(explanation.anomaly_map, truth, region)
        baseline = pixel_metrics(intensity, truth, region)
        metrics.update({f"pixel_{k}": v for k, v in pixel.as_dict().items()})
        metrics.update({f"intensity_baseline_{k}": v for k, v in baseline.as_dict().items()})
    save_like(explanation.anomaly_map, scan, outputs["anomaly_map"])
    for c in range(len(r.scans)):
        save_like(explanation.healthy[c], scan, outputs[f"healthy_{c}" if c else "healthy"])
    planes = input_planes(scan, explanation, cfg.data, truth)
    vmax = metrics["anomaly_max"]
    peaks = planes.anomaly_map[..., planes.kept].max(axis=(0, 1))
    rows = np.sort(planes.kept[np.argsort(-peaks, kind="stable")[: cfg.explain.montage_slices]])
    explain_montage([(int(planes.numbers[k]), _views(planes, k, vmax)) for k in rows], vmax, outputs["montage"])
    review = review_selection(planes.kept, r.review_slices)
    write_dicom_outputs(scan, explanation.anomaly_map, explanation.healthy, threshold, dicom)
    params = _params(r, settings, bundle, bundle_name, model_ref, precision_name(model_device(bundle), settings.amp))
    params = {k: redact(v, private) if isinstance(v, str) else v for k, v in params.items()}
    listed = {k: redact(str(v), private) for k, v in outputs.items()}
    summary = {"params": params, "metrics": metrics, "outputs": listed}
    atomic_write_bytes(json.dumps(summary, indent=2).encode(), outputs["summary"])
    tags = {"adiff.train_run_id": bundle.train_run_id} if bundle.train_run_id else {}
    if model_ref:
        tags["adiff.model"] = model_ref
    with tracked_run(
        r.tracking_uri, cfg.tracking.experiment, f"explain-{stems[0]}", "explain", tags, started_at=started_at
    ) as run:
        run.log_params(params)
        run.log_metrics(metrics)
        for key, path in outputs.items():
            if key not in dicom.paths:  # DICOM outputs carry the patient's identifiers: never logged
                run.log_artifact(path, "explain")
        for k in review:
            views = _views(planes, int(k), vmax)
            # the grey views as one channel: a third of the bytes to encode (PNG and WebP) and to store
            grey_and_overlay = (views.input[..., 0], views.healthy[..., 0], views.overlay)
            for key, image in zip(REVIEW_KEYS, grey_and_overlay, strict=True):
                run.log_image(image, key, step=int(planes.numbers[k]))
        run.log_text(_run_description(params, metrics), "README.md")
        review_text, montage_text = _review_pointer(
            run.run_id, planes.numbers[review], len(planes.kept), r.review_slices, outputs["montage"].name
        )
        description = f"{review_text}{_run_description(params, metrics)}{montage_text}"
        run.set_tags({"mlflow.note.content": description})
    return ExplainOutcome(run.run_id, outputs, metrics, pixel, baseline, time.perf_counter() - started, explanation)


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


def _params(
    r: ExplainRequest,
    settings: ExplainSettings,
    bundle: ModelBundle,
    bundle_name: str,
    model_ref: str | None,
    precision: str,
) -> dict[str, object]:
    return {
        "noise_level": settings.noise_level,
        "scale": settings.scale,
        "steps": settings.grid.steps,
        "residual": settings.residual,
        "guidance": settings.guidance,
        "batch_size": settings.batch_size,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "inputs": ";".join(p.name for p in r.scans),
        "checkpoint": bundle_name,
        "model": model_ref or "",
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
    lines = [
        f"Explained `{params['inputs']}` with L={params['noise_level']}, s={params['scale']}, "
        f"K={params['steps']} DDIM steps; the map is made by {guided}, {params['residual']} residual.",
        "",
        healthy,
        f"- max anomaly score: {metrics['anomaly_max']:.3f}; {metrics['anomaly_volume_ml']:.2f} mL above the "
        f"threshold {metrics['anomaly_threshold']:.3f}",
    ]
    if "pixel_auprc" in metrics:
        lines.append(
            f"- against the given mask: AUPRC {metrics['pixel_auprc']:.3f}, best Dice {metrics['pixel_dice_best']:.3f} "
            f"(raw intensity baseline: AUPRC {metrics['intensity_baseline_auprc']:.3f})"
        )
    return "\n".join(lines)
