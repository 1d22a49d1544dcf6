"""`adiff explain`: one scan's healthy counterfactual and anomaly map, written in its space and tracked."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from skimage.filters import threshold_otsu

from anomaly_diffusion.data.dicom import redact
from anomaly_diffusion.data.dicom_out import plan_dicom_outputs, write_dicom_outputs
from anomaly_diffusion.data.io import Scan, check_input_kind, check_writable, load_scan, read_mask, save_like
from anomaly_diffusion.data.transforms import explained_region, mask_to_slices, normalise
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.explain import ENCODINGS, ExplainSettings, explain_scan_ensemble, explain_settings, is_stochastic
from anomaly_diffusion.files import atomic_write_bytes
from anomaly_diffusion.metrics import PixelMetrics, pixel_metrics
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.plots import explain_montage
from anomaly_diffusion.runtime import compute_summary, model_device, precision_name, prepare_for_inference
from anomaly_diffusion.scans import ScanExplanation
from anomaly_diffusion.tracking import tracked_run
from anomaly_diffusion.usecases.common import load_model, output_stem


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
        encoding: an `ENCODINGS` name (None: 'ddim'); decoding: a `DECODINGS` name (None: the model's).
        ensemble_levels: noise levels whose maps are averaged (replaces noise_level), as evaluate's L=100+200.
        draws: draws of a stochastic encoding averaged per level (seeds 0..draws-1), as evaluate's n=.
            An ensemble of more than one member also writes its per-voxel spread (`_uncertainty.nii.gz`).
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
    encoding: str | None = None
    decoding: str | None = None
    ensemble_levels: Sequence[int] = ()
    draws: int = 1

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


def _output_paths(stems: Sequence[str], out_dir: Path, ensemble: bool = False) -> dict[str, Path]:
    stem = stems[0]
    return {
        "anomaly_map": out_dir / f"{stem}_anomaly_map.nii.gz",
        **({"uncertainty": out_dir / f"{stem}_uncertainty.nii.gz"} if ensemble else {}),
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
    bundle, bundle_name, model_ref = load_model(r.model, r.tracking_uri, r.device)
    bundle = prepare_for_inference(bundle, r.compile_networks or bundle.config.explain.compile, r.fp32)
    cfg = bundle.config
    plans = [
        explain_settings(
            bundle,
            noise_level=level,
            steps=r.steps,
            scale=r.scale,
            guidance=r.guidance,
            residual=r.residual,
            batch_size=r.batch_size,
            encoding=r.encoding or "ddim",
            seed=draw,
            decoding=r.decoding,
        )
        for level in (list(r.ensemble_levels) if r.ensemble_levels else [r.noise_level])
        for draw in range(r.draws)
    ]
    settings = plans[0]
    scan = load_scan(list(r.scans), expected_channels=cfg.data.image_channels)
    check_input_kind(scan, bundle.extra.get("trained_on"))
    truth = read_mask(r.mask, scan) if r.mask is not None else None
    brain = read_mask(r.brainmask, scan) if r.brainmask is not None else None
    private = scan.identifiers()  # DICOM patient identifiers: into the DICOM outputs only, never MLflow
    stems = [_public_stem(p, c, scan, private) for c, p in enumerate(r.scans)]
    dicom = plan_dicom_outputs(scan, r.out_dir, stems)
    outputs = {**_output_paths(stems, r.out_dir, len(plans) > 1), **dicom.paths}
    for path in outputs.values():
        check_writable(path, r.overwrite)
    if announce is not None:
        announce(f"compute: {compute_summary(model_device(bundle), settings.amp)}")
        if dicom.note:
            announce(dicom.note)
    ensemble = explain_scan_ensemble(bundle, scan, plans, brainmask=brain, progress=progress)
    explanation = ensemble.explanation
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
    for c in range(len(r.scans)):
        save_like(explanation.healthy[c], scan, outputs[f"healthy_{c}" if c else "healthy"])
    order = torch.argsort(slices.anomaly_map.flatten(1).amax(dim=1), descending=True)
    rows = order[: cfg.explain.montage_slices].sort().values.tolist()
    truth_slices = mask_to_slices(truth, explanation.state) if truth is not None else None
    kept = explanation.state.kept.tolist()
    explain_montage(slices.x, slices.x_healthy, slices.anomaly_map, kept, rows, outputs["montage"], truth_slices)
    write_dicom_outputs(scan, explanation.anomaly_map, explanation.healthy, threshold, dicom)
    params = _params(r, settings, bundle, bundle_name, model_ref, precision_name(model_device(bundle), settings.amp))
    params.update(_ensemble_params(r, plans))
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
        run.log_text(_run_description(params, metrics), "README.md")
        run.set_tags({"mlflow.note.content": _run_description(params, metrics)})
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


def _ensemble_params(r: ExplainRequest, plans: Sequence[ExplainSettings]) -> dict[str, object]:
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
    if len(plans) > 1:
        params["ensemble_levels"] = "+".join(str(level) for level in dict.fromkeys(p.noise_level for p in plans))
        params["ensemble_draws"] = r.draws
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
        f"{params['encoding']} encoding, {params['decoding']} decoding.",
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
