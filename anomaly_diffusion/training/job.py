"""Both training phases as one resumable job: checkpoints, resume, the model bundle, snapshots.

`train` runs the DDPM, then (`method: classifier`) the classifier (the loops are in `loops.py`;
a classifier-free model has only the DDPM phase, label-conditional), writes a resume
checkpoint (`checkpoint.pt`) every `train.checkpoint_every` steps, and at the end the model bundle
(`bundle.pt`) and the final optimisation state (`train_state.pt`), from which a finished training
is extended to more steps (`adiff train --resume OUT --set train.ddpm_steps=N`). Nothing here
prints or logs: callbacks do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomaly_diffusion.config import Config
from anomaly_diffusion.data.datasets import SliceDataset
from anomaly_diffusion.data.io import trained_on
from anomaly_diffusion.diffusion.sampling import ddim_decode, ddim_encode, ddim_grid, ddim_sample
from anomaly_diffusion.diffusion.schedule import NoiseSchedule, make_schedule
from anomaly_diffusion.distributed import SINGLE, DistContext
from anomaly_diffusion.models.bundle import atomic_torch_save, bundle_dict, save_bundle
from anomaly_diffusion.runtime import resolve_device
from anomaly_diffusion.training.loops import (
    MetricSink,
    PhaseProgress,
    SaveCheckpoint,
    classifier_phase,
    ddpm_phase,
    train_classifier,
    train_ddpm,
)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    bundle_path: Path
    ddpm_loss: float
    classifier_loss: float
    classifier_accuracy: dict[str, float]


CHECKPOINT_NAME = "checkpoint.pt"
BUNDLE_NAME = "bundle.pt"
FINAL_STATE_NAME = "train_state.pt"
"""The finished run's optimisation state (phase 'done'): what extending it to more steps resumes."""


def train(
    cfg: Config,
    data: SliceDataset,
    out_dir: Path,
    val: SliceDataset | None = None,
    sink: MetricSink | None = None,
    progress: PhaseProgress | None = None,
    train_run_id: str | None = None,
    resume: dict[str, Any] | None = None,
    observer: Callable[[int, nn.Module], None] | None = None,
    context: DistContext = SINGLE,
) -> TrainResult:
    """Train both models and write `out_dir/bundle.pt`.

    Every `checkpoint_every` steps of either phase, `out_dir/checkpoint.pt` is written atomically:
    a valid bundle plus `train_state` (both phases' weights, EMA, optimisers, scalers, batch
    generators, steps, the global RNG). `resume` takes that `train_state` and continues exactly
    where it stopped; a kill loses at most one checkpoint interval. At the end the same state, phase
    'done', goes to `out_dir/train_state.pt`: resumed with larger `train.ddpm_steps` or
    `train.classifier_steps`, each phase continues from its last step (one never restarts).
    `observer(step, ema_unet)` is called at every DDPM checkpoint and when the DDPM is done (for
    sample/reconstruction figures).

    Under torchrun (`context.active`) every rank trains its shard of each global batch; only rank
    0 writes the checkpoint and the bundle and calls the observer.
    """
    device = resolve_device(cfg.train.device)
    if context.active and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    schedule = make_schedule(
        cfg.schedule.kind, cfg.schedule.num_timesteps, cfg.schedule.beta_start, cfg.schedule.beta_end
    )
    ddpm = ddpm_phase(cfg, device)
    clf = classifier_phase(cfg, device) if cfg.method == "classifier" else None
    inputs = trained_on(v.kind for v in data.volumes)  # explain refuses other kinds (a 2D image for a 3D model)
    if resume is not None:
        ddpm.load_state_dict(resume["ddpm"])
        if clf is not None:
            clf.load_state_dict(resume["classifier"])
        torch.set_rng_state(resume["torch_rng"])
    ddpm_from = ddpm.step

    def state_payload(phase_name: str, step: int) -> dict[str, Any]:
        assert ddpm.ema is not None
        state = {
            "phase": phase_name,
            "ddpm": ddpm.state_dict(),
            "classifier": clf.state_dict() if clf is not None else None,
            "torch_rng": torch.get_rng_state(),
        }
        payload = bundle_dict(
            config=cfg,
            schedule=schedule,
            unet=ddpm.ema.module,
            classifier=clf.model if clf is not None else None,
            train_run_id=train_run_id,
            extra={"phase": phase_name, "step": step, "complete": phase_name == "done", "trained_on": inputs},
        )
        return {**payload, "train_state": state}

    def checkpoint(phase_name: str) -> SaveCheckpoint:
        def save(step: int) -> None:
            if not context.is_main:
                return
            atomic_torch_save(state_payload(phase_name, step), out_dir / CHECKPOINT_NAME)
            if observer is not None and phase_name == "ddpm":
                assert ddpm.ema is not None
                observed.append(step)
                observer(step, ddpm.ema.module)

        return save

    observed: list[int] = []

    unet, ddpm_last = train_ddpm(cfg, schedule, data, device, ddpm, sink, progress, checkpoint("ddpm"), context)
    if (
        context.is_main
        and observer is not None
        and cfg.train.ddpm_steps not in observed
        and ddpm_from < cfg.train.ddpm_steps  # DDPM steps ran in this call (not only the classifier)
    ):
        observer(cfg.train.ddpm_steps, unet)
    classifier: nn.Module | None = None
    classifier_last, accuracy = float("nan"), dict[str, float]()
    if clf is not None:
        classifier, classifier_last, accuracy = train_classifier(
            cfg, schedule, data, device, val, clf, sink, progress, checkpoint("classifier"), context
        )
    bundle_path = out_dir / BUNDLE_NAME
    if not context.is_main:
        context.barrier()  # rank 0 writes the bundle
        return TrainResult(bundle_path, ddpm_last, classifier_last, accuracy)
    save_bundle(
        out_dir / BUNDLE_NAME,
        config=cfg,
        schedule=schedule,
        unet=unet,
        classifier=classifier,
        train_run_id=train_run_id,
        extra={
            "complete": True,
            "train_summary": {k: int(v) for k, v in data.summary().items()},
            "trained_on": inputs,
        },
    )
    atomic_torch_save(state_payload("done", cfg.train.ddpm_steps), out_dir / FINAL_STATE_NAME)
    (out_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
    context.barrier()
    return TrainResult(bundle_path, ddpm_last, classifier_last, accuracy)


SNAPSHOT_SAMPLE_STEPS = 25


def snapshot_images(
    unet: nn.Module, schedule: NoiseSchedule, inputs: torch.Tensor, n_samples: int, noise_level: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a DDPM checkpoint can do, for the training run's figures, on CPU.

    Returns:
        (n_samples unconditional samples, `SNAPSHOT_SAMPLE_STEPS` DDIM steps; reconstructions of
        `inputs` (N, C, S, S) encoded to min(L, T-1) and decoded in min(20, L) steps).
    """
    device = next(unet.parameters()).device
    unet.eval()

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t).float()

    shape = (n_samples, *inputs.shape[1:])
    generator = torch.Generator().manual_seed(seed)
    samples = ddim_sample(eps_fn, shape, schedule, SNAPSHOT_SAMPLE_STEPS, generator, device)
    level = min(noise_level, schedule.num_timesteps - 1)
    grid = ddim_grid(level, min(20, level), schedule.num_timesteps)
    x = inputs.to(device)
    recon = ddim_decode(eps_fn, ddim_encode(eps_fn, x, schedule, grid), schedule, grid)
    return samples.cpu(), recon.cpu()
