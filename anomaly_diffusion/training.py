"""Explicit training loops: the DDPM (eps-prediction) and the noise-aware classifier.

DDPM (Ho 2020, Alg. 1): t ~ U{0..T-1}, eps ~ N(0, I), minimise ||eps - eps_theta(x_t, t)||^2.
Classifier (Dhariwal & Nichol 2021): cross-entropy of p(y | x_t, t) on noised slices, same t law.
Both use AdamW, gradient clipping, AMP on CUDA, and explicit torch.Generators; the DDPM keeps
EMA weights (`torch.optim.swa_utils.AveragedModel`). Nothing here prints or logs to MLflow:
metrics go to a `MetricSink` callback and progress to a `Progress` callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from anomaly_diffusion.config import Config
from anomaly_diffusion.data.datasets import SliceDataset
from anomaly_diffusion.diffusion.schedule import NoiseSchedule, make_schedule, q_sample
from anomaly_diffusion.errors import AdiffError, InputError
from anomaly_diffusion.labels import HEALTHY, PATHOLOGICAL
from anomaly_diffusion.models.bundle import save_bundle
from anomaly_diffusion.models.networks import NoiseAwareClassifier, build_classifier, build_unet

MetricSink = Callable[[dict[str, float], int], None]
Progress = Callable[[str, int, int, dict[str, float]], None]
"""(phase, step, total steps, latest metrics)."""


class TrainingError(AdiffError):
    """Training cannot go on (e.g. a non-finite loss)."""


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    bundle_path: Path
    ddpm_loss: float
    classifier_loss: float
    classifier_accuracy: dict[str, float]


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager[object]:
    """bf16 autocast on CUDA where supported (fp16 otherwise); nothing on CPU, where it is slower."""
    if not enabled or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    fp16 = enabled and device.type == "cuda" and not torch.cuda.is_bf16_supported()
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


def _check_finite(loss: torch.Tensor, phase: str, step: int) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(f"{phase} loss became {value} at step {step}; stopping (last checkpoint kept)")
    return value


def ddpm_loss(unet: nn.Module, schedule: NoiseSchedule, x_0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Simple DDPM loss (Ho 2020, eq. 14) on a batch x_0 (B, C, *spatial)."""
    t = torch.randint(0, schedule.num_timesteps, (x_0.shape[0],), generator=generator).to(x_0.device)
    noise = torch.randn(x_0.shape, generator=generator).to(x_0.device)
    x_t = q_sample(schedule, x_0, t, noise)
    return F.mse_loss(unet(x_t, t).float(), noise)


def _batch(images: torch.Tensor, size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    index = torch.randint(0, images.shape[0], (size,), generator=generator)
    return images[index].to(device, non_blocking=True)


def train_ddpm(
    cfg: Config,
    schedule: NoiseSchedule,
    data: SliceDataset,
    device: torch.device,
    sink: MetricSink | None = None,
    progress: Progress | None = None,
    checkpoint: Callable[[nn.Module, int], None] | None = None,
) -> tuple[nn.Module, float]:
    """Train eps_theta on the configured slices; returns (EMA UNet, last mean loss)."""
    tc = cfg.train
    pool = data.images if cfg.data.ddpm_train_on == "all" else data.images[data.labels == HEALTHY]
    if tc.ddpm_steps and pool.shape[0] == 0:
        raise InputError(f"no {cfg.data.ddpm_train_on} training slices for the DDPM")
    generator = torch.Generator().manual_seed(tc.seed)
    torch.manual_seed(tc.seed)
    unet = build_unet(cfg.unet, cfg.data.image_channels).to(device)
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=tc.ddpm_lr, weight_decay=tc.weight_decay)
    scaler = _scaler(device, tc.amp)
    running: list[float] = []
    last = float("nan")
    for step in range(1, tc.ddpm_steps + 1):
        unet.train()
        with autocast(device, tc.amp):
            loss = ddpm_loss(unet, schedule, _batch(pool, tc.batch_size, generator, device), generator)
        running.append(_check_finite(loss, "DDPM", step))
        grad_norm = _optimise(loss, unet, optimiser, scaler, tc.grad_clip)
        ema.update_parameters(unet)
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
            checkpoint(ema.module, step)
    return ema.module.eval(), last


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
    sink: MetricSink | None = None,
    progress: Progress | None = None,
) -> tuple[NoiseAwareClassifier, float, dict[str, float]]:
    """Train p(y | x_t, t) on class-balanced batches; returns (classifier, last loss, accuracy by quartile)."""
    tc = cfg.train
    healthy, pathological = data.images[data.labels == HEALTHY], data.images[data.labels == PATHOLOGICAL]
    if tc.classifier_steps and (healthy.shape[0] == 0 or pathological.shape[0] == 0):
        raise InputError(
            f"the classifier needs both classes; training data has {healthy.shape[0]} healthy and "
            f"{pathological.shape[0]} pathological slices"
        )
    generator = torch.Generator().manual_seed(tc.seed + 1)
    torch.manual_seed(tc.seed + 1)
    classifier = build_classifier(cfg.classifier, cfg.data.image_channels).to(device)
    optimiser = torch.optim.AdamW(classifier.parameters(), lr=tc.classifier_lr, weight_decay=tc.weight_decay)
    scaler = _scaler(device, tc.amp)
    max_t = schedule.num_timesteps - 1 if tc.classifier_max_timestep is None else tc.classifier_max_timestep
    t_high = min(schedule.num_timesteps - 1, max_t) + 1
    half = max(tc.batch_size // 2, 1)
    labels = torch.cat([torch.full((half,), HEALTHY), torch.full((tc.batch_size - half,), PATHOLOGICAL)]).to(device)
    running_loss: list[float] = []
    running_correct: list[float] = []
    last = float("nan")
    for step in range(1, tc.classifier_steps + 1):
        classifier.train()
        x_0 = torch.cat(
            [_batch(healthy, half, generator, device), _batch(pathological, tc.batch_size - half, generator, device)]
        )
        if tc.classifier_flip:
            flip = torch.rand(x_0.shape[0], generator=generator).to(device) < 0.5
            x_0 = torch.where(flip.reshape(-1, *([1] * (x_0.dim() - 1))), x_0.flip(-1), x_0)
        t = torch.randint(0, t_high, (x_0.shape[0],), generator=generator).to(device)
        x_t = q_sample(schedule, x_0, t, torch.randn(x_0.shape, generator=generator).to(device))
        with autocast(device, tc.amp):
            logits = classifier(x_t, t).float()
            loss = F.cross_entropy(logits, labels)
        running_loss.append(_check_finite(loss, "classifier", step))
        running_correct.append(float((logits.argmax(dim=1) == labels).float().mean()))
        _optimise(loss, classifier, optimiser, scaler, tc.grad_clip)
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
    classifier.eval()
    accuracy = classifier_accuracy_by_quartile(
        classifier, schedule, val if val is not None and len(val) else data, device, tc.seed
    )
    if sink is not None:
        sink(accuracy, tc.classifier_steps)
    return classifier, last, accuracy


def train(
    cfg: Config,
    data: SliceDataset,
    out_dir: Path,
    val: SliceDataset | None = None,
    sink: MetricSink | None = None,
    progress: Progress | None = None,
    train_run_id: str | None = None,
) -> TrainResult:
    """Train both models and write `out_dir/bundle.pt` (periodic `checkpoint.pt` on the way)."""
    device = resolve_device(cfg.train.device)
    schedule = make_schedule(
        cfg.schedule.kind, cfg.schedule.num_timesteps, cfg.schedule.beta_start, cfg.schedule.beta_end
    )

    untrained_classifier = build_classifier(cfg.classifier, cfg.data.image_channels)

    def checkpoint(unet: nn.Module, step: int) -> None:
        save_bundle(
            out_dir / "checkpoint.pt",
            config=cfg,
            schedule=schedule,
            unet=unet,
            classifier=untrained_classifier,
            train_run_id=train_run_id,
            extra={"phase": "ddpm", "step": step, "complete": False},
        )

    unet, ddpm_last = train_ddpm(cfg, schedule, data, device, sink, progress, checkpoint)
    classifier, classifier_last, accuracy = train_classifier(cfg, schedule, data, device, val, sink, progress)
    bundle_path = save_bundle(
        out_dir / "bundle.pt",
        config=cfg,
        schedule=schedule,
        unet=unet,
        classifier=classifier,
        train_run_id=train_run_id,
        extra={"complete": True, "train_summary": {k: int(v) for k, v in data.summary().items()}},
    )
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)
    return TrainResult(bundle_path, ddpm_last, classifier_last, accuracy)
