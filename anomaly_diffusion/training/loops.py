"""Explicit training loops: the DDPM (eps-prediction) and the noise-aware classifier.

DDPM (Ho 2020, Alg. 1): t ~ U{0..T-1}, eps ~ N(0, I), minimise ||eps - eps_theta(x_t, t)||^2.
Classifier-free (Ho & Salimans 2022, Alg. 1): the same loss for eps(x_t, t, y) with each label y
replaced by the null label with probability p (`cfg.label_dropout`, `drop_labels`); no classifier.
Classifier (Dhariwal & Nichol 2021): cross-entropy of p(y | x_t, t) on noised slices, same t law.
Both use AdamW, gradient clipping, AMP (CUDA, and CPUs with native bf16: AMX or AVX512-BF16), and explicit
torch.Generators; the DDPM keeps EMA weights (`torch.optim.swa_utils.AveragedModel`). Nothing
here prints or logs to MLflow: metrics go to a `MetricSink` callback and progress to a
`PhaseProgress` callback. `training.job.train` runs both phases with checkpoints and writes the bundle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from anomaly_diffusion.config import Config
from anomaly_diffusion.data.augment import random_zoom_shift
from anomaly_diffusion.data.datasets import SliceDataset
from anomaly_diffusion.diffusion.schedule import NoiseSchedule, q_sample
from anomaly_diffusion.distributed import SINGLE, DistContext
from anomaly_diffusion.errors import AdiffError, InputError
from anomaly_diffusion.labels import HEALTHY, NULL_LABEL, PATHOLOGICAL
from anomaly_diffusion.models.networks import NoiseAwareClassifier, build_classifier, build_unet
from anomaly_diffusion.runtime import autocast, choose_precision

MetricSink = Callable[[dict[str, float], int], None]
PhaseProgress = Callable[[str, int, int, dict[str, float]], None]
"""(phase, step, total steps, latest metrics)."""


class TrainingError(AdiffError):
    """Training cannot go on (e.g. a non-finite loss)."""


def _scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Loss scaling exactly when autocast computes in fp16 (CUDA without bf16), see `runtime.choose_precision`."""
    fp16 = device.type == "cuda" and choose_precision(device, enabled).dtype == torch.float16
    return torch.amp.GradScaler("cuda", enabled=fp16)


def _optimise(
    loss: torch.Tensor, model: nn.Module, optimiser: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip: float
) -> float:
    optimiser.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimiser)
    grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip))
    scaler.step(optimiser)
    scaler.update()
    return grad_norm


def _compiled(model: nn.Module, enabled: bool) -> nn.Module:
    """`torch.compile(model)` when enabled (train.compile); the weights stay those of `model`."""
    return cast(nn.Module, torch.compile(model)) if enabled else model


def _check_finite(loss: torch.Tensor, phase: str, step: int) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(f"{phase} loss became {value} at step {step}; stopping (last checkpoint kept)")
    return value


def ddpm_loss(
    unet: nn.Module,
    schedule: NoiseSchedule,
    x_0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Simple DDPM loss (Ho 2020, eq. 14): ||eps - eps_theta(x_t, t[, y])||^2 with x_t = q_sample(x_0, t, eps).

    Args:
        x_0: clean images (B, C, *spatial); t: timesteps (B,); noise: eps, same shape as x_0.
        y: class labels (B,) for a label-conditional UNet (classifier-free guidance); None: unconditional.
    """
    x_t = q_sample(schedule, x_0, t, noise)
    eps = unet(x_t, t) if y is None else unet(x_t, t, y)
    return F.mse_loss(eps.float(), noise)


@dataclass(frozen=True)
class DdpmBatch:
    """One DDPM training batch: x_0 (B, C, *spatial), t (B,), eps (like x_0), slice labels y (B,)."""

    x_0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    y: torch.Tensor


def ddpm_batch(
    pool: torch.Tensor,
    labels: torch.Tensor,
    size: int,
    schedule: NoiseSchedule,
    generator: torch.Generator,
    device: torch.device,
) -> DdpmBatch:
    """A DDPM training batch drawn from the generator: x_0 and its labels, t ~ U{0..T-1}, eps ~ N(0, I), on device."""
    index = torch.randint(0, pool.shape[0], (size,), generator=generator)
    x_0 = pool[index].to(device, non_blocking=True)
    t = torch.randint(0, schedule.num_timesteps, (size,), generator=generator).to(device)
    noise = torch.randn(x_0.shape, generator=generator).to(device)
    return DdpmBatch(x_0, t, noise, labels[index].to(device))


def drop_labels(y: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Each label replaced by NULL_LABEL with probability p, independently (Ho & Salimans 2022, Alg. 1).

    Args:
        y: class labels (B,); p: the dropout probability; generator: the (CPU) source of the draws.
    """
    dropped = torch.rand(y.shape[0], generator=generator).to(y.device) < p
    return torch.where(dropped, torch.full_like(y, NULL_LABEL), y)


def _batch(images: torch.Tensor, size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    index = torch.randint(0, images.shape[0], (size,), generator=generator)
    return images[index].to(device, non_blocking=True)


@dataclass
class Phase:
    """The optimisation state of one model: everything a checkpoint needs to resume it exactly."""

    model: nn.Module
    optimiser: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    ema: AveragedModel | None = None
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors and primitives) for `torch.save`."""
        return {
            "model": self.model.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self.model.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])


def ddpm_phase(cfg: Config, device: torch.device) -> Phase:
    """A fresh DDPM UNet with EMA, AdamW, scaler and its seeded batch generator."""
    torch.manual_seed(cfg.train.seed)
    unet = build_unet(cfg.unet, cfg.data.image_channels, conditional=cfg.method == "classifier_free").to(device)
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=cfg.train.ddpm_lr, weight_decay=cfg.train.weight_decay)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    return Phase(unet, optimiser, _scaler(device, cfg.train.amp), generator, ema)


def classifier_phase(cfg: Config, device: torch.device) -> Phase:
    """A fresh noise-aware classifier with AdamW, scaler and its seeded batch generator."""
    torch.manual_seed(cfg.train.seed + 1)
    classifier = build_classifier(cfg.classifier, cfg.data.image_channels).to(device)
    optimiser = torch.optim.AdamW(
        classifier.parameters(), lr=cfg.train.classifier_lr, weight_decay=cfg.train.weight_decay
    )
    generator = torch.Generator().manual_seed(cfg.train.seed + 1)
    return Phase(classifier, optimiser, _scaler(device, cfg.train.amp), generator)


SaveCheckpoint = Callable[[int], None]
"""Called with the step just finished when a resume checkpoint is due."""


def train_ddpm(
    cfg: Config,
    schedule: NoiseSchedule,
    data: SliceDataset,
    device: torch.device,
    phase: Phase | None = None,
    sink: MetricSink | None = None,
    progress: PhaseProgress | None = None,
    checkpoint: SaveCheckpoint | None = None,
    context: DistContext = SINGLE,
) -> tuple[nn.Module, float]:
    """Train eps_theta on the configured slices from `phase.step`; returns (EMA UNet, last mean loss).

    Each step draws a global batch of batch_size x world_size and trains on this rank's shard.
    With `method: classifier_free` the UNet is label-conditional and sees each slice's label, or
    the null label with probability `cfg.label_dropout`.
    """
    tc = cfg.train
    keep = slice(None) if cfg.data.ddpm_train_on == "all" else data.labels == HEALTHY
    pool, pool_labels = data.images[keep], data.labels[keep]
    conditional = cfg.method == "classifier_free"
    if tc.ddpm_steps and pool.shape[0] == 0:
        raise InputError(f"no {cfg.data.ddpm_train_on} training slices for the DDPM")
    phase = phase or ddpm_phase(cfg, device)
    assert phase.ema is not None
    unet, generator = phase.model, phase.generator
    model = _compiled(context.wrap(unet, device), tc.compile)
    running: list[float] = []
    last = float("nan")
    for step in range(phase.step + 1, tc.ddpm_steps + 1):
        unet.train()
        batch = ddpm_batch(pool, pool_labels, tc.batch_size * context.world_size, schedule, generator, device)
        y = context.shard(drop_labels(batch.y, cfg.cfg.label_dropout, generator)) if conditional else None
        with autocast(device, tc.amp):
            loss = ddpm_loss(
                model, schedule, context.shard(batch.x_0), context.shard(batch.t), context.shard(batch.noise), y
            )
        running.append(_check_finite(context.mean(loss), "DDPM", step))
        grad_norm = _optimise(loss, unet, phase.optimiser, phase.scaler, tc.grad_clip)
        phase.ema.update_parameters(unet)
        phase.step = step
        if step % tc.log_every == 0 or step == tc.ddpm_steps:
            last = sum(running) / len(running)
            metrics = {"ddpm_loss": last, "ddpm_grad_norm": grad_norm}
            running.clear()
            if sink is not None:
                sink(metrics, step)
            if progress is not None:
                progress("ddpm", step, tc.ddpm_steps, metrics)
        elif progress is not None:
            progress("ddpm", step, tc.ddpm_steps, {})
        if checkpoint is not None and step % tc.checkpoint_every == 0:
            checkpoint(step)
    return phase.ema.module.eval(), last


def classifier_accuracy_by_quartile(
    classifier: NoiseAwareClassifier,
    schedule: NoiseSchedule,
    data: SliceDataset,
    device: torch.device,
    seed: int = 0,
    max_slices: int = 256,
    batch_size: int = 64,
) -> dict[str, float]:
    """Accuracy of p(y | x_t, t) with t drawn in each quarter of 0..T-1 (q1 = least noise)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)[:max_slices]
    images, labels = data.images[order], data.labels[order]
    T = schedule.num_timesteps
    result: dict[str, float] = {}
    classifier.eval()
    with torch.no_grad():
        for q in range(4):
            low, high = q * T // 4, (q + 1) * T // 4
            correct = 0
            for start in range(0, len(images), batch_size):
                x_0 = images[start : start + batch_size].to(device)
                t = torch.randint(low, high, (x_0.shape[0],), generator=generator).to(device)
                x_t = q_sample(schedule, x_0, t, torch.randn(x_0.shape, generator=generator).to(device))
                predicted = classifier(x_t, t).argmax(dim=1).cpu()
                correct += int((predicted == labels[start : start + batch_size]).sum())
            result[f"classifier_acc_q{q + 1}"] = correct / max(len(images), 1)
    return result


def train_classifier(
    cfg: Config,
    schedule: NoiseSchedule,
    data: SliceDataset,
    device: torch.device,
    val: SliceDataset | None = None,
    phase: Phase | None = None,
    sink: MetricSink | None = None,
    progress: PhaseProgress | None = None,
    checkpoint: SaveCheckpoint | None = None,
    context: DistContext = SINGLE,
) -> tuple[NoiseAwareClassifier, float, dict[str, float]]:
    """Train p(y | x_t, t) on class-balanced batches from `phase.step`.

    Each step draws a global batch of batch_size x world_size and trains on this rank's shard.

    Returns:
        (classifier, last mean loss, accuracy by t-quartile on `val` or the training data).
    """
    tc = cfg.train
    healthy, pathological = data.images[data.labels == HEALTHY], data.images[data.labels == PATHOLOGICAL]
    if tc.classifier_steps and (healthy.shape[0] == 0 or pathological.shape[0] == 0):
        raise InputError(
            f"the classifier needs both classes; training data has {healthy.shape[0]} healthy and "
            f"{pathological.shape[0]} pathological slices"
        )
    phase = phase or classifier_phase(cfg, device)
    classifier, generator = phase.model, phase.generator
    assert isinstance(classifier, NoiseAwareClassifier)
    max_t = schedule.num_timesteps - 1 if tc.classifier_max_timestep is None else tc.classifier_max_timestep
    t_high = min(schedule.num_timesteps - 1, max_t) + 1
    size = tc.batch_size * context.world_size
    half = max(size // 2, 1)
    labels = torch.cat([torch.full((half,), HEALTHY), torch.full((size - half,), PATHOLOGICAL)]).to(device)
    model = _compiled(context.wrap(classifier, device), tc.compile)
    running_loss: list[float] = []
    running_correct: list[float] = []
    last = float("nan")
    for step in range(phase.step + 1, tc.classifier_steps + 1):
        classifier.train()
        x_0 = torch.cat(
            [_batch(healthy, half, generator, device), _batch(pathological, size - half, generator, device)]
        )
        if tc.classifier_flip:
            flip = torch.rand(x_0.shape[0], generator=generator).to(device) < 0.5
            x_0 = torch.where(flip.reshape(-1, *([1] * (x_0.dim() - 1))), x_0.flip(-1), x_0)
        x_0 = random_zoom_shift(x_0, tc.classifier_jitter, generator)
        t = torch.randint(0, t_high, (x_0.shape[0],), generator=generator).to(device)
        x_t = q_sample(schedule, x_0, t, torch.randn(x_0.shape, generator=generator).to(device))
        x_t, t, y = context.shard(x_t), context.shard(t), context.shard(labels)
        with autocast(device, tc.amp):
            logits = model(x_t, t).float()
            loss = F.cross_entropy(logits, y)
        running_loss.append(_check_finite(context.mean(loss), "classifier", step))
        running_correct.append(float(context.mean((logits.argmax(dim=1) == y).float().mean())))
        _optimise(loss, classifier, phase.optimiser, phase.scaler, tc.grad_clip)
        phase.step = step
        if step % tc.log_every == 0 or step == tc.classifier_steps:
            last = sum(running_loss) / len(running_loss)
            metrics = {"classifier_loss": last, "classifier_train_acc": sum(running_correct) / len(running_correct)}
            running_loss.clear()
            running_correct.clear()
            if sink is not None:
                sink(metrics, step)
            if progress is not None:
                progress("classifier", step, tc.classifier_steps, metrics)
        elif progress is not None:
            progress("classifier", step, tc.classifier_steps, {})
        if checkpoint is not None and step % tc.checkpoint_every == 0:
            checkpoint(step)
    classifier.eval()
    accuracy = classifier_accuracy_by_quartile(
        classifier, schedule, val if val is not None and len(val) else data, device, tc.seed
    )
    if sink is not None:
        sink(accuracy, tc.classifier_steps)
    return classifier, last, accuracy
