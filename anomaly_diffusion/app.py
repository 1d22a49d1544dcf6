"""Use cases behind the CLI commands: each joins data, models, diffusion and tracking.

The CLI parses options and prints; these functions do the work and return typed outcomes.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.filters import threshold_otsu
from torch import nn

from anomaly_diffusion.config import Config, config_from_dict, load_config, override_explain
from anomaly_diffusion.data.datasets import SliceDataset, VolumeInfo, load_slices
from anomaly_diffusion.data.io import atomic_write_bytes, check_writable, load_scan, read_mask, save_like
from anomaly_diffusion.data.manifest import ManifestRow, read_manifest
from anomaly_diffusion.data.transforms import explained_region as region_of
from anomaly_diffusion.data.transforms import mask_to_slices, normalise
from anomaly_diffusion.diffusion.sampling import ddim_decode, ddim_encode, ddim_sample
from anomaly_diffusion.diffusion.schedule import make_schedule
from anomaly_diffusion.distributed import SINGLE, DistContext
from anomaly_diffusion.errors import CheckpointError, ConfigError, InputError
from anomaly_diffusion.evaluation import (
    MAX_MEDIAN_FILTER,
    EvaluationReport,
    Method,
    VolumeScores,
    check_methods,
    evaluate,
    flat_metrics,
    parse_method,
    report_markdown,
    score_volume,
)
from anomaly_diffusion.explain import (
    RESIDUALS,
    Guidance,
    Residual,
    ScanExplanation,
    auto_batch_size,
    check_explain_options,
    explain_scan,
    prepare_for_inference,
)
from anomaly_diffusion.labels import HEALTHY, PATHOLOGICAL
from anomaly_diffusion.metrics import PixelMetrics, per_slice_otsu_dice, pixel_metrics
from anomaly_diffusion.models.bundle import ModelBundle, load_bundle, read_bundle_file
from anomaly_diffusion.plots import (
    dice_vs_threshold,
    evaluation_montage,
    explain_montage,
    roc_pr_curves,
    training_snapshot,
)
from anomaly_diffusion.tracking import (
    MODELS_PREFIX,
    RunLogger,
    fetch_registered_bundle,
    flatten,
    make_client,
    register_model,
    tracked_run,
)
from anomaly_diffusion.training import (
    BUNDLE_NAME,
    CHECKPOINT_NAME,
    Progress,
    TrainResult,
    precision_name,
    resolve_device,
    train,
)

PACKAGED_CONFIGS = ("default", "demo", "tiny")


def resolve_config_path(name: str | None) -> Path | None:
    """A config file path, or the name of a config shipped with the package ('default', 'demo', 'tiny')."""
    if name is None:
        return None
    path = Path(name)
    if path.exists() or name not in PACKAGED_CONFIGS:
        return path
    return Path(str(resources.files("anomaly_diffusion.configs") / f"{name}.yaml"))


def timestamped(prefix: str) -> str:
    """A run name like 'train-20261122-081500'."""
    return f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class TrainOutcome:
    """A finished training run."""

    run_id: str
    out_dir: Path
    result: TrainResult
    summary: dict[str, dict[str, int]]
    seconds: float
    registered: str | None = None


def run_train(
    cfg: Config | None,
    tracking_uri: str,
    out_dir: Path | None = None,
    run_name: str | None = None,
    progress: Progress | None = None,
    on_data: Callable[[dict[str, dict[str, int]]], None] | None = None,
    resume: Path | None = None,
    register: str | None = None,
    context: DistContext = SINGLE,
) -> TrainOutcome:
    """Load the manifest's train (and val) split, train both models in one tracked MLflow run.

    With `resume` (a training output folder), the config, the weights, the optimiser and RNG
    states and the MLflow run come from its `checkpoint.pt`; `cfg`, if given, must be equal.
    Under torchrun every rank trains and only rank 0 talks to MLflow (other ranks get run_id '').
    """
    started = time.perf_counter()
    state, run_id, registered = None, None, None
    if resume is not None:
        cfg, state, run_id = _resume_point(resume, cfg)
        out_dir = resume
    assert cfg is not None
    if cfg.data.manifest is None:
        raise ConfigError("data.manifest is not set; pass --set data.manifest=PATH or set it in the config")
    if context.is_main:
        make_client(tracking_uri)  # an unusable tracking store fails before any data is read
    rows = read_manifest(cfg.data.manifest)
    train_rows = [r for r in rows if r.split == "train"]
    val_rows = [r for r in rows if r.split == "val"]
    if not train_rows:
        raise InputError(f"{cfg.data.manifest}: no subjects in the train split")
    name = str(context.broadcast(run_name or timestamped("train")))
    out_dir = out_dir or cfg.train.output_dir / name
    data = load_slices(train_rows, cfg.data)
    val = load_slices(val_rows, cfg.data) if val_rows else None
    _preflight(cfg, data)
    if resume is None:
        check_writable(out_dir / BUNDLE_NAME, overwrite=False)
        check_writable(out_dir / CHECKPOINT_NAME, overwrite=False)
    summary = {"train": data.summary(), **({"val": val.summary()} if val is not None else {})}
    if on_data is not None and context.is_main:
        on_data(summary)
    if not context.is_main:
        result = train(cfg, data, out_dir, val, resume=state, context=context)
        return TrainOutcome("", out_dir, result, summary, time.perf_counter() - started)
    with tracked_run(tracking_uri, cfg.tracking.experiment, name, "train", resume_run_id=run_id) as run:
        if resume is None:
            run.log_params(flatten(cfg.model_dump(mode="json")))
            run.log_params({f"dataset.{split}.{k}": v for split, counts in summary.items() for k, v in counts.items()})
            run.log_params(
                {
                    "train.world_size": context.world_size,
                    "train.global_batch_size": cfg.train.batch_size * context.world_size,
                }
            )
            run.log_dict(cfg.model_dump(mode="json"), "config.yaml")
            run.log_dict(summary, "dataset_summary.json")
        observer = _snapshot_observer(cfg, val if val is not None else data, out_dir / "snapshots", run)
        result = train(
            cfg,
            data,
            out_dir,
            val,
            sink=run.log_metrics,
            progress=progress,
            train_run_id=run.run_id,
            resume=state,
            observer=observer,
            context=context,
        )
        run.log_metrics(result.classifier_accuracy)
        run.log_artifact(result.bundle_path, "model")
        if register is not None:
            registered = f"{register}/{register_model(tracking_uri, run.run_id, register)}"
            run.set_tags({"adiff.registered_model": registered})
    return TrainOutcome(run.run_id, out_dir, result, summary, time.perf_counter() - started, registered)


SNAPSHOT_SAMPLES = 8
SNAPSHOT_SLICES = 4


def _snapshot_observer(
    cfg: Config, data: SliceDataset, folder: Path, run: RunLogger
) -> Callable[[int, nn.Module], None]:
    """At each DDPM checkpoint: a PNG of unconditional samples and of validation encode/decode, logged to the run."""
    schedule = make_schedule(
        cfg.schedule.kind, cfg.schedule.num_timesteps, cfg.schedule.beta_start, cfg.schedule.beta_end
    )
    generator = torch.Generator().manual_seed(cfg.train.seed)
    pathological = torch.nonzero(data.labels == PATHOLOGICAL).flatten()[: SNAPSHOT_SLICES // 2]
    healthy = torch.nonzero(data.labels == HEALTHY).flatten()[: SNAPSHOT_SLICES - len(pathological)]
    inputs = data.images[torch.cat([healthy, pathological])]
    noise_level = min(cfg.explain.noise_level, cfg.schedule.num_timesteps - 1)
    steps = min(20, noise_level)

    def observe(step: int, unet: nn.Module) -> None:
        device = next(unet.parameters()).device
        unet.eval()

        def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return unet(x_t, t).float()

        shape = (SNAPSHOT_SAMPLES, *data.images.shape[1:])
        samples = ddim_sample(eps_fn, shape, schedule, 25, generator.manual_seed(cfg.train.seed), device)
        x = inputs.to(device)
        recon = ddim_decode(eps_fn, ddim_encode(eps_fn, x, schedule, noise_level, steps), schedule, noise_level, steps)
        title = f"DDPM step {step}: samples ({25} DDIM steps) and reconstructions (L={noise_level}, K={steps})"
        path = training_snapshot(samples.cpu(), x.cpu(), recon.cpu(), title, folder / f"step_{step:07d}.png")
        run.log_artifact(path, "snapshots")

    return observe


def _resume_point(folder: Path, cfg: Config | None) -> tuple[Config, dict[str, Any], str | None]:
    """(config, train_state, MLflow run id) of the checkpoint in a training output folder."""
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        if (folder / BUNDLE_NAME).is_file():
            raise InputError(f"{folder}: training already finished ({BUNDLE_NAME} exists); nothing to resume")
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    data = read_bundle_file(path)
    if "train_state" not in data:
        raise CheckpointError(f"{path}: not a training checkpoint (no train_state)")
    saved = config_from_dict(data["config"], source=f"{path} (config)")
    if cfg is not None and cfg != saved:
        mine, theirs = flatten(cfg.model_dump(mode="json")), flatten(saved.model_dump(mode="json"))
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise ConfigError(f"{path}: checkpoint is from another config (differs in {', '.join(differ[:5])})")
    return saved, data["train_state"], data.get("train_run_id")


def _preflight(cfg: Config, data: SliceDataset) -> None:
    """Refuse data that cannot train what the config asks for, before any training starts."""
    healthy, pathological = data.count(HEALTHY), data.count(PATHOLOGICAL)
    if cfg.train.classifier_steps and (healthy == 0 or pathological == 0):
        raise InputError(
            f"{cfg.data.manifest}: the classifier needs both classes; the train split has {healthy} healthy and "
            f"{pathological} pathological slices"
        )
    if cfg.train.ddpm_steps and cfg.data.ddpm_train_on == "healthy" and healthy == 0:
        raise InputError(f"{cfg.data.manifest}: no healthy train slices for the DDPM (data.ddpm_train_on=healthy)")


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


def output_stem(path: Path) -> str:
    """'scan.nii.gz' -> 'scan', 'xray.png' -> 'xray'; a DICOM folder -> its name."""
    return re.sub(r"\.(nii|nii\.gz|png|jpe?g|tiff?|bmp|npy|dcm)$", "", path.name, flags=re.IGNORECASE)


def find_latest_bundle(root: Path) -> Path:
    """The newest complete bundle under root (for explain without --checkpoint)."""
    bundles = sorted(root.glob("*/bundle.pt"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not bundles:
        raise CheckpointError(
            f"no --checkpoint given and no trained bundle found under {root}/; pass --checkpoint PATH"
        )
    return bundles[-1]


def explained_region(explanation: ScanExplanation) -> np.ndarray:
    """Voxels of the input grid that the model saw (kept slices, inside the crop box), (X, Y, Z) bool."""
    return region_of(explanation.state)


def load_model(checkpoint: Path | str, tracking_uri: str, device: str = "auto") -> tuple[ModelBundle, str, str | None]:
    """A bundle from a file or a registered model (`models:/NAME/VERSION`, `models:/NAME@ALIAS`).

    Returns:
        (bundle, file name, 'NAME/VERSION' for a registered model or None).
    """
    with tempfile.TemporaryDirectory(prefix="adiff-model-") as download:
        if str(checkpoint).startswith(MODELS_PREFIX):
            path, model_ref = fetch_registered_bundle(tracking_uri, str(checkpoint), Path(download))
        else:
            path, model_ref = Path(checkpoint), None
        return load_bundle(path, resolve_device(device)), path.name, model_ref


def run_explain(
    scans: Sequence[Path],
    checkpoint: Path | str,
    out_dir: Path,
    tracking_uri: str,
    noise_level: int | None = None,
    scale: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    mask: Path | None = None,
    brainmask: Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    threshold: float | None = None,
    compile_networks: bool = False,
    fp32: bool = False,
    residual: Residual | None = None,
    guidance: Guidance | None = None,
) -> ExplainOutcome:
    """Explain one scan with a bundle file or a registered model (`models:/NAME/VERSION` or `models:/NAME@ALIAS`).

    Writes NIfTI maps, a montage and a JSON summary, and tracks it all in one MLflow run.
    """
    started = time.perf_counter()
    started_at = time.time()
    bundle, checkpoint_name, model_ref = load_model(checkpoint, tracking_uri, device)
    bundle = prepare_for_inference(bundle, compile_networks or bundle.config.explain.compile, fp32)
    cfg = bundle.config
    noise_level = cfg.explain.noise_level if noise_level is None else noise_level
    scale = cfg.explain.scale if scale is None else scale
    steps = cfg.explain.steps if steps is None else steps
    residual = residual or cfg.explain.residual
    if residual not in RESIDUALS:
        raise ConfigError(f"--residual must be one of {', '.join(RESIDUALS)}, got {residual!r}")
    guidance = guidance or cfg.explain.guidance
    batch_size = batch_size or cfg.explain.batch_size or auto_batch_size(bundle)
    check_explain_options(bundle, noise_level, scale, steps, guidance)
    scan = load_scan(list(scans), expected_channels=cfg.data.image_channels)
    truth = read_mask(mask, scan) if mask is not None else None
    brain = read_mask(brainmask, scan) if brainmask is not None else None
    stem = output_stem(scans[0])
    outputs = {
        "anomaly_map": out_dir / f"{stem}_anomaly_map.nii.gz",
        **{
            f"healthy_{c}" if c else "healthy": out_dir / f"{output_stem(p)}_healthy.nii.gz"
            for c, p in enumerate(scans)
        },
        "montage": out_dir / f"{stem}_montage.png",
        "summary": out_dir / f"{stem}_explain.json",
    }
    for path in outputs.values():
        check_writable(path, overwrite)
    explanation = explain_scan(
        bundle,
        scan,
        noise_level,
        scale,
        steps,
        batch_size,
        brainmask=brain,
        amp=cfg.train.amp,
        progress=progress,
        residual=residual,
        guidance=guidance,
    )
    slices = explanation.slices
    scores = explanation.anomaly_map[explanation.foreground & explained_region(explanation)]
    threshold = threshold if threshold is not None else cfg.explain.threshold
    if threshold is None:
        threshold = float(threshold_otsu(scores)) if scores.size and np.ptp(scores) > 0 else float("inf")
    metrics = {
        "p_healthy_before_mean": float(slices.p_healthy_before.mean()),
        "p_healthy_after_mean": float(slices.p_healthy_after.mean()),
        "p_healthy_before_min": float(slices.p_healthy_before.min()),
        "p_healthy_after_min": float(slices.p_healthy_after.min()),
        "anomaly_max": float(explanation.anomaly_map.max()),
        "anomaly_mean": float(slices.anomaly_map.mean()),
        "slices_explained": float(len(explanation.state.kept)),
        "anomaly_threshold": threshold,
        "anomaly_volume_ml": float((explanation.anomaly_map > threshold).sum()) * scan.voxel_volume_ml,
    }
    pixel = baseline = None
    if truth is not None:
        # both detectors are scored on the same voxels: foreground inside the explained slices
        region = explained_region(explanation) & explanation.foreground
        intensity = normalise(scan.data, explanation.state, cfg.data)[0]
        pixel = pixel_metrics(explanation.anomaly_map, truth, region)
        baseline = pixel_metrics(intensity, truth, region)
        metrics.update({f"pixel_{k}": v for k, v in pixel.as_dict().items()})
        metrics.update({f"intensity_baseline_{k}": v for k, v in baseline.as_dict().items()})
    save_like(explanation.anomaly_map, scan, outputs["anomaly_map"])
    for c in range(len(scans)):
        save_like(explanation.healthy[c], scan, outputs[f"healthy_{c}" if c else "healthy"])
    order = torch.argsort(slices.anomaly_map.flatten(1).amax(dim=1), descending=True)
    rows = order[: cfg.explain.montage_slices].sort().values.tolist()
    truth_slices = mask_to_slices(truth, explanation.state) if truth is not None else None
    explain_montage(
        slices.x,
        slices.x_healthy,
        slices.anomaly_map,
        explanation.state.kept.tolist(),
        rows,
        outputs["montage"],
        truth_slices,
    )
    params: dict[str, object] = {
        "noise_level": noise_level,
        "scale": scale,
        "steps": steps if steps is not None else noise_level,
        "residual": residual,
        "guidance": guidance,
        "batch_size": batch_size,
        "precision": precision_name(next(bundle.unet.parameters()).device, cfg.train.amp),
        "inputs": ";".join(p.name for p in scans),
        "checkpoint": checkpoint_name,
        "model": model_ref or "",
        "bundle_version": bundle.package_version,
    }
    summary = {"params": params, "metrics": metrics, "outputs": {k: str(v) for k, v in outputs.items()}}
    atomic_write_bytes(json.dumps(summary, indent=2).encode(), outputs["summary"])
    tags = {"adiff.train_run_id": bundle.train_run_id} if bundle.train_run_id else {}
    if model_ref:
        tags["adiff.model"] = model_ref
    with tracked_run(
        tracking_uri, cfg.tracking.experiment, f"explain-{stem}", "explain", tags, started_at=started_at
    ) as run:
        run.log_params(params)
        run.log_metrics(metrics)
        for path in outputs.values():
            run.log_artifact(path, "explain")
        run.log_text(_run_description(params, metrics), "README.md")
        run.set_tags({"mlflow.note.content": _run_description(params, metrics)})
    return ExplainOutcome(run.run_id, outputs, metrics, pixel, baseline, time.perf_counter() - started, explanation)


def _run_description(params: dict[str, object], metrics: dict[str, float]) -> str:
    lines = [
        f"Explained `{params['inputs']}` with L={params['noise_level']}, s={params['scale']}, "
        f"K={params['steps']} DDIM steps, {params['guidance']} guidance; map: {params['residual']} residual.",
        "",
        f"- p(healthy) before: {metrics['p_healthy_before_mean']:.3f} (mean over slices), "
        f"after: {metrics['p_healthy_after_mean']:.3f}",
        f"- max anomaly score: {metrics['anomaly_max']:.3f}; {metrics['anomaly_volume_ml']:.2f} mL above the "
        f"threshold {metrics['anomaly_threshold']:.3f}",
    ]
    if "pixel_auprc" in metrics:
        lines.append(
            f"- against the given mask: AUPRC {metrics['pixel_auprc']:.3f}, best Dice {metrics['pixel_dice_best']:.3f} "
            f"(raw intensity baseline: AUPRC {metrics['intensity_baseline_auprc']:.3f})"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class DatasetReport:
    """What `adiff inspect` prints: per-split counts and per-volume facts."""

    splits: dict[str, dict[str, int]]
    volumes: tuple[VolumeInfo, ...]


def inspect_dataset(manifest: Path, cfg: Config, progress: Callable[[int, int], None] | None = None) -> DatasetReport:
    """Load every volume of a manifest as training would; refuse inconsistent data with one line."""
    rows = read_manifest(manifest)
    splits: dict[str, dict[str, int]] = {}
    volumes: list[VolumeInfo] = []
    for split in ("train", "val", "test"):
        split_rows = [r for r in rows if r.split == split]
        if split_rows:
            data = load_slices(split_rows, cfg.data, progress)
            splits[split] = data.summary()
            volumes.extend(data.volumes)
    return DatasetReport(splits, tuple(volumes))


def demo_config(manifest: Path, output_dir: Path, overrides: list[str] | None = None) -> Config:
    """The packaged demo config pointed at a built demo dataset."""
    path = resolve_config_path("demo")
    assert path is not None
    base = load_config(path).model_dump(mode="json")
    base["data"]["manifest"] = str(manifest)
    base["train"]["output_dir"] = str(output_dir)
    return config_from_dict(base, overrides, source="demo config")


@dataclass(frozen=True)
class EvaluateOutcome:
    """A finished evaluation: the report, its files and its MLflow run."""

    run_id: str
    report: EvaluationReport
    outputs: dict[str, Path]
    seconds: float


EvaluateProgress = Callable[[int, int, str, str], None]
"""(volume index, volumes in total, subject, method being run)."""


def _score_split(
    bundle: ModelBundle,
    rows: Sequence[ManifestRow],
    methods: Sequence[Method],
    batch_size: int,
    median_size: int,
    progress: EvaluateProgress | None,
) -> list[VolumeScores]:
    scored = []
    for i, row in enumerate(rows):

        def step(method: str, i: int = i, row: ManifestRow = row) -> None:
            if progress is not None:
                progress(i, len(rows), row.subject, method)

        scored.append(score_volume(bundle, row, methods, batch_size, median_size, bundle.config.train.amp, step))
    if progress is not None and rows:
        progress(len(rows), len(rows), rows[-1].subject, "")
    return scored


def _montage_rows(volumes: Sequence[VolumeScores], method: str) -> list[tuple[str, Any]]:
    """Best, median and worst diseased slices of `method` by their Otsu Dice."""
    ranked = []
    for v in volumes:
        for k, d in per_slice_otsu_dice(v.scores[method], v.truth, v.slice_ids).items():
            if k in v.examples:
                ranked.append((d, v.subject, k, v.examples[k]))
    if not ranked:
        return []
    ranked.sort(key=lambda item: item[0])
    picks = {"best": ranked[-1], "median": ranked[len(ranked) // 2], "worst": ranked[0]}
    return [(f"{label} slice (Dice {d:.2f})\n{s}, slice {k}", ex) for label, (d, s, k, ex) in picks.items()]


def run_evaluate(
    manifest: Path,
    checkpoint: Path | str,
    out_dir: Path,
    tracking_uri: str,
    split: str = "val",
    methods: Sequence[str] = ("guided", "unguided", "intensity"),
    threshold_split: str | None = None,
    median_size: int = 0,
    fprs: Sequence[float] = (0.01, 0.05),
    bootstrap: int = 1000,
    batch_size: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    max_volumes: int | None = None,
    progress: EvaluateProgress | None = None,
    context: DistContext = SINGLE,
    compile_networks: bool = False,
    fp32: bool = False,
    explain_overrides: Sequence[str] = (),
) -> EvaluateOutcome | None:
    """Score every method on a manifest split against its lesion masks; write tables and plots; track in MLflow.

    Args:
        manifest: dataset manifest; rows of `split` need lesion masks.
        checkpoint: bundle file or `models:/NAME/VERSION` / `models:/NAME@ALIAS`.
        methods: specs for `parse_method` (guided, unguided, paper, intensity[:C], NAME:L=..,s=..,K=..).
        threshold_split: a split whose volumes choose the Dice threshold and the FPR thresholds;
            None: leave one volume out (Dice) and this split's lesion-free slices (FPR).
        median_size: in-plane median filter of every map (0 or 1 = none).
        max_volumes: evaluate only the first N volumes of each split (quick looks).
        context: under torchrun, each rank scores every world_size-th volume and rank 0 gathers
            them, reports and logs; other ranks return None.
        explain_overrides: `explain.KEY=VALUE` settings replacing the bundle's explain defaults
            (what `guided` means), e.g. to score a trained model with the defaults of a newer config.
    """
    started = time.perf_counter()
    started_at = time.time()
    if not 0 <= median_size <= MAX_MEDIAN_FILTER:
        raise ConfigError(f"--median-filter must be in 0..{MAX_MEDIAN_FILTER}, got {median_size}")
    for fpr in fprs:
        if not 0 < fpr < 1:
            raise ConfigError(f"false-positive rates must be in (0, 1), got {fpr}")
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {bootstrap}")
    if threshold_split is not None and threshold_split == split:
        raise ConfigError(
            f"--threshold-split must differ from --split ({split}): a threshold chosen on the "
            "evaluated volumes is the oracle, which is reported anyway as Dice (best)"
        )
    bundle, checkpoint_name, model_ref = load_model(checkpoint, tracking_uri, device)
    if explain_overrides:
        bundle = replace(bundle, config=override_explain(bundle.config, list(explain_overrides)))
    bundle = prepare_for_inference(bundle, compile_networks or bundle.config.explain.compile, fp32)
    cfg = bundle.config
    parsed = [parse_method(m, cfg) for m in methods]
    check_methods(parsed, bundle)
    rows = read_manifest(manifest)

    def split_rows(name: str) -> list[ManifestRow]:
        chosen = [r for r in rows if r.split == name]
        if not chosen:
            raise InputError(f"{manifest}: no subjects in the {name} split")
        missing = [r.subject for r in chosen if r.mask is None]
        if missing:
            raise InputError(f"{manifest}: {name} subjects without a lesion mask cannot be evaluated: {missing[:5]}")
        return chosen[:max_volumes] if max_volumes else chosen

    eval_rows = split_rows(split)
    threshold_rows = split_rows(threshold_split) if threshold_split else []
    outputs = {
        "table": out_dir / "results.md",
        "json": out_dir / "results.json",
        "curves": out_dir / "roc_pr.png",
        "dice_threshold": out_dir / "dice_threshold.png",
        "montage": out_dir / "montage.png",
    }
    for path in outputs.values():
        check_writable(path, overwrite)
    batch = batch_size or cfg.explain.batch_size or auto_batch_size(bundle)

    def scored(split_rows: list[ManifestRow]) -> list[VolumeScores]:
        mine = _score_split(bundle, context.shard_list(split_rows), parsed, batch, median_size, progress)
        shards = context.gather(mine)
        if not context.is_main:
            return []
        # rank r scored rows r, r + N, ...: interleave back into manifest order
        order = [i for r in range(context.world_size) for i in range(r, len(split_rows), context.world_size)]
        flat = [v for shard in shards for v in shard]  # type: ignore[attr-defined]
        return [v for _, v in sorted(zip(order, flat, strict=True), key=lambda item: item[0])]

    volumes = scored(eval_rows)
    threshold_volumes = scored(threshold_rows) or None
    if not context.is_main:
        return None
    report = evaluate(
        volumes, parsed, split, threshold_volumes, fprs, bootstrap, median_size, cfg.train.seed, threshold_split
    )
    curves = {
        m.name: (np.concatenate([v.scores[m.name] for v in volumes]), np.concatenate([v.truth for v in volumes]))
        for m in parsed
    }
    title = f"{split} split, {len(volumes)} volume(s)"
    markdown = report_markdown(report)
    atomic_write_bytes(markdown.encode(), outputs["table"])
    atomic_write_bytes(json.dumps(report.as_dict(), indent=2, default=float).encode(), outputs["json"])
    roc_pr_curves(curves, outputs["curves"], title)
    dice_vs_threshold(curves, outputs["dice_threshold"], f"Dice vs threshold ({title})")
    primary = next((m.name for m in parsed if m.kind == "diffusion"), None)
    evaluation_montage(_montage_rows(volumes, primary) if primary else [], outputs["montage"])
    params = {
        "split": split,
        "manifest": manifest.name,
        "methods": ";".join(f"{m.name}={m.describe()}" for m in parsed),
        "threshold_split": threshold_split or "",
        "threshold_source": report.threshold_source,
        "median_filter": median_size,
        "bootstrap": bootstrap,
        "fprs": ",".join(f"{f:g}" for f in fprs),
        "volumes": len(volumes),
        "precision": precision_name(next(bundle.unet.parameters()).device, cfg.train.amp),
        "checkpoint": checkpoint_name,
        "model": model_ref or "",
        "explain_overrides": ";".join(explain_overrides),
    }
    tags = {"adiff.train_run_id": bundle.train_run_id} if bundle.train_run_id else {}
    with tracked_run(
        tracking_uri, cfg.tracking.experiment, f"evaluate-{split}", "evaluate", tags, started_at=started_at
    ) as run:
        run.log_params(params)
        run.log_metrics(flat_metrics(report))
        for path in outputs.values():
            run.log_artifact(path, "evaluate")
        run.set_tags({"mlflow.note.content": markdown})
    return EvaluateOutcome(run.run_id, report, outputs, time.perf_counter() - started)
