"""`adiff train`: load the manifest's splits, train both models in one tracked MLflow run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomaly_diffusion.config import Config, config_from_dict
from anomaly_diffusion.data.datasets import SliceDataset, load_slices
from anomaly_diffusion.data.io import check_writable
from anomaly_diffusion.data.manifest import read_manifest
from anomaly_diffusion.diffusion.schedule import make_schedule
from anomaly_diffusion.distributed import SINGLE, DistContext
from anomaly_diffusion.errors import CheckpointError, ConfigError, InputError
from anomaly_diffusion.labels import HEALTHY, PATHOLOGICAL
from anomaly_diffusion.models.bundle import read_bundle_file
from anomaly_diffusion.plots import training_snapshot
from anomaly_diffusion.runtime import compute_summary, precision_name, resolve_device
from anomaly_diffusion.tracking import RunLogger, flatten, make_client, register_model, tracked_run
from anomaly_diffusion.training.job import (
    BUNDLE_NAME,
    CHECKPOINT_NAME,
    FINAL_STATE_NAME,
    SNAPSHOT_SAMPLE_STEPS,
    TrainResult,
    snapshot_images,
    train,
)
from anomaly_diffusion.training.loops import PhaseProgress
from anomaly_diffusion.usecases.common import timestamped

DataSummary = dict[str, dict[str, int]]


@dataclass(frozen=True)
class TrainOutcome:
    """A finished training run."""

    run_id: str
    out_dir: Path
    result: TrainResult
    summary: DataSummary
    seconds: float
    registered: str | None = None


def run_train(
    cfg: Config | None,
    tracking_uri: str,
    out_dir: Path | None = None,
    run_name: str | None = None,
    progress: PhaseProgress | None = None,
    on_data: Callable[[DataSummary], None] | None = None,
    resume: Path | None = None,
    resume_overrides: list[str] | None = None,
    register: str | None = None,
    context: DistContext = SINGLE,
    announce: Callable[[str], None] | None = None,
) -> TrainOutcome:
    """Load the manifest's train (and val) split, train both models in one tracked MLflow run.

    With `resume` (a training output folder), the config, the weights, the optimiser and RNG
    states and the MLflow run come from its `checkpoint.pt`; `cfg`, if given, must be equal
    (`resume_overrides` instead apply to the saved config). A finished folder resumes with larger
    step counts only: the same run trains on (see `_resume_point`).
    Under torchrun every rank trains and only rank 0 talks to MLflow (other ranks get run_id '').
    `announce` is told the device, threads and precision before training starts.
    """
    started = time.perf_counter()
    state, run_id, registered = None, None, None
    if resume is not None:
        cfg, state, run_id = _resume_point(resume, cfg, resume_overrides)
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
    device = resolve_device(cfg.train.device)
    if announce is not None and context.is_main:
        announce(f"compute: {compute_summary(device, cfg.train.amp)}")
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
                    "train.precision": precision_name(device, cfg.train.amp),
                    "train.threads": torch.get_num_threads(),
                }
            )
            run.log_dict(cfg.model_dump(mode="json"), "config.yaml")
            run.log_dict(summary, "dataset_summary.json")
        elif state is not None and state["phase"] == "done":  # params are immutable: the new length is a tag
            run.set_tags({"train.extended_to": f"ddpm {cfg.train.ddpm_steps}, classifier {cfg.train.classifier_steps}"})
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
        description = _run_description(cfg, summary, result, precision_name(device, cfg.train.amp), registered)
        run.set_tags({"mlflow.note.content": description})
    return TrainOutcome(run.run_id, out_dir, result, summary, time.perf_counter() - started, registered)


def _run_description(
    cfg: Config, summary: DataSummary, result: TrainResult, precision: str, registered: str | None
) -> str:
    """The training run's description in the MLflow UI (markdown)."""
    data = "; ".join(f"{split}: " + ", ".join(f"{k}={v}" for k, v in c.items()) for split, c in summary.items())
    accuracy = ", ".join(f"{k.removeprefix('classifier_acc_')} {v:.3f}" for k, v in result.classifier_accuracy.items())
    size = f"{cfg.data.image_size}x{cfg.data.image_size}"
    if cfg.method == "classifier_free":
        trained = [
            f"Trained a label-conditional DDPM for classifier-free guidance ({cfg.train.ddpm_steps} steps on "
            f"{cfg.data.ddpm_train_on} slices with their slice labels, null label with probability "
            f"{cfg.cfg.label_dropout:g}; UNet {list(cfg.unet.channels)}) at {size}, in {precision}. No classifier.",
            "",
            f"- data: {data}",
            f"- final DDPM loss {result.ddpm_loss:.4f}",
        ]
    else:
        trained = [
            f"Trained the DDPM ({cfg.train.ddpm_steps} steps on {cfg.data.ddpm_train_on} slices, UNet "
            f"{list(cfg.unet.channels)}) and the noise-aware classifier ({cfg.train.classifier_steps} steps, "
            f"{cfg.classifier.pooling} pooling) at {size}, in {precision}.",
            "",
            f"- data: {data}",
            f"- final DDPM loss {result.ddpm_loss:.4f}; classifier loss {result.classifier_loss:.4f}",
            f"- classifier accuracy by quarter of the timestep range (q1 = least noise): {accuracy}",
        ]
    lines = [
        *trained,
        f"- explain defaults: L={cfg.explain.noise_level}, s={cfg.explain.scale:g}, K={cfg.explain.steps or 'L'}, "
        f"{cfg.explain.guidance} guidance, {cfg.explain.residual} residual",
        "- model bundle: artifacts `model/bundle.pt`" + (f", registered as models:/{registered}" if registered else ""),
    ]
    return "\n".join(lines)


SNAPSHOT_SAMPLES = 8
SNAPSHOT_SLICES = 4


def _snapshot_observer(
    cfg: Config, data: SliceDataset, folder: Path, run: RunLogger
) -> Callable[[int, nn.Module], None]:
    """At each DDPM checkpoint: a PNG of unconditional samples and of validation encode/decode, logged to the run."""
    schedule = make_schedule(
        cfg.schedule.kind, cfg.schedule.num_timesteps, cfg.schedule.beta_start, cfg.schedule.beta_end
    )
    pathological = torch.nonzero(data.labels == PATHOLOGICAL).flatten()[: SNAPSHOT_SLICES // 2]
    healthy = torch.nonzero(data.labels == HEALTHY).flatten()[: SNAPSHOT_SLICES - len(pathological)]
    inputs = data.images[torch.cat([healthy, pathological])]
    noise_level = min(cfg.explain.noise_level, cfg.schedule.num_timesteps - 1)

    def observe(step: int, unet: nn.Module) -> None:
        samples, recon = snapshot_images(unet, schedule, inputs, SNAPSHOT_SAMPLES, noise_level, cfg.train.seed)
        title = (
            f"DDPM step {step}: samples ({SNAPSHOT_SAMPLE_STEPS} DDIM steps) and reconstructions "
            f"(L={noise_level}, K={min(20, noise_level)})"
        )
        path = training_snapshot(samples, inputs, recon, title, folder / f"step_{step:07d}.png")
        run.log_artifact(path, "snapshots")

    return observe


EXTENDABLE = ("train.ddpm_steps", "train.classifier_steps")
"""The settings a finished training may be resumed with larger values of (trained on, never restarted)."""


def _resume_point(
    folder: Path, cfg: Config | None, overrides: list[str] | None = None
) -> tuple[Config, dict[str, Any], str | None]:
    """(config, train_state, MLflow run id) of the checkpoint in a training output folder.

    `cfg`, if given, must equal the saved config; else `overrides` apply to the saved one.
    A finished folder (`bundle.pt` and `train_state.pt`, no checkpoint) resumes only when `cfg`
    raises some of `EXTENDABLE` and changes nothing else: the run goes on to the new step counts.
    """
    path = folder / CHECKPOINT_NAME
    extend = False
    if not path.is_file():
        if not (folder / BUNDLE_NAME).is_file():
            raise CheckpointError(f"{path}: no checkpoint to resume from")
        if not (folder / FINAL_STATE_NAME).is_file():
            raise InputError(f"{folder}: training already finished ({BUNDLE_NAME} exists); nothing to resume")
        path, extend = folder / FINAL_STATE_NAME, True
    data = read_bundle_file(path)
    if "train_state" not in data:
        raise CheckpointError(f"{path}: not a training checkpoint (no train_state)")
    saved = config_from_dict(data["config"], source=f"{path} (config)")
    if cfg is None and overrides:
        cfg = config_from_dict(data["config"], overrides, source=f"{path} (config) with --set")
    if cfg is None or cfg == saved:
        if extend:
            raise InputError(
                f"{folder}: training already finished ({BUNDLE_NAME} exists); nothing to resume "
                f"(to train longer, resume with a larger {' or '.join(EXTENDABLE)})"
            )
        return saved, data["train_state"], data.get("train_run_id")
    mine, theirs = flatten(cfg.model_dump(mode="json")), flatten(saved.model_dump(mode="json"))
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if not extend or any(k not in EXTENDABLE for k in differ):
        raise ConfigError(f"{path}: checkpoint is from another config (differs in {', '.join(differ[:5])})")
    if shorter := [f"{k}={mine[k]} < {theirs[k]}" for k in differ if int(mine[k] or 0) < int(theirs[k] or 0)]:
        raise ConfigError(f"{folder}: a finished training resumes only to more steps ({', '.join(shorter)})")
    return cfg, data["train_state"], data.get("train_run_id")


def _preflight(cfg: Config, data: SliceDataset) -> None:
    """Refuse data that cannot train what the config asks for, before any training starts."""
    healthy, pathological = data.count(HEALTHY), data.count(PATHOLOGICAL)
    if cfg.method == "classifier_free" and cfg.train.ddpm_steps and healthy == 0:
        raise InputError(
            f"{cfg.data.manifest}: classifier-free guidance towards healthy needs healthy slices; "
            "the train split has none"
        )
    if cfg.method == "classifier" and cfg.train.classifier_steps and (healthy == 0 or pathological == 0):
        raise InputError(
            f"{cfg.data.manifest}: the classifier needs both classes; the train split has {healthy} healthy and "
            f"{pathological} pathological slices"
        )
    if cfg.train.ddpm_steps and cfg.data.ddpm_train_on == "healthy" and healthy == 0:
        raise InputError(f"{cfg.data.manifest}: no healthy train slices for the DDPM (data.ddpm_train_on=healthy)")
