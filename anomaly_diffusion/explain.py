"""Explain a scan: DDIM-encode without guidance, decode with classifier guidance towards healthy.

    x_L = ddim_encode(eps_theta, x, L)                                         (no guidance)
    x_healthy = ddim_decode(eps_hat, x_L, L),  eps_hat = eps - s sqrt(1 - alpha_bar_t) grad log p(healthy | x_t)
    anomaly map = sum_c |x_c - x_healthy_c|                                     (Wolleb 2022)

Slices are processed in batches on the model's device; the map is computed at model resolution
in normalised units and mapped back onto the input's voxel grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from anomaly_diffusion.data.io import Scan
from anomaly_diffusion.data.transforms import (
    PreprocessState,
    denormalise_delta,
    fit_preprocess,
    foreground_mask,
    mask_to_slices,
    to_input_grid,
    to_slices,
)
from anomaly_diffusion.diffusion.guidance import classifier_grad_fn, guided_eps_fn
from anomaly_diffusion.diffusion.sampling import ddim_decode, ddim_encode
from anomaly_diffusion.diffusion.schedule import ddim_timesteps
from anomaly_diffusion.errors import ConfigError, InputError
from anomaly_diffusion.labels import HEALTHY
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.training import autocast

SliceProgress = Callable[[int, int], None]
"""(slices done, slices in total)."""

MAX_SCALE = 1e5


@dataclass(frozen=True)
class SliceExplanation:
    """Explanation of a batch of model-size slices.

    Attributes:
        x: inputs, (N, C, S, S), normalised units.
        x_healthy: healthy counterfactuals, same shape.
        anomaly_map: sum over channels of |x - x_healthy|, (N, S, S).
        p_healthy_before: p(healthy | x, t=0), (N,).
        p_healthy_after: p(healthy | x_healthy, t=0), (N,).
    """

    x: torch.Tensor
    x_healthy: torch.Tensor
    anomaly_map: torch.Tensor
    p_healthy_before: torch.Tensor
    p_healthy_after: torch.Tensor


@dataclass(frozen=True)
class ScanExplanation:
    """Explanation of a whole scan, on the input's grid and at model resolution.

    Attributes:
        anomaly_map: (X, Y, Z) on the input grid, 0 outside the foreground and the explained slices.
        healthy: (C, X, Y, Z) healthy counterfactual in the input's intensity units.
        slices: the model-resolution explanation of the kept slices (its map also masked).
        state: how the scan was preprocessed (kept slice indices, crop, intensities).
        foreground: (X, Y, Z) bool, the brain/foreground mask the scores are restricted to.
        slice_foreground: (N, S, S) bool, the same at model resolution.
    """

    anomaly_map: np.ndarray
    healthy: np.ndarray
    slices: SliceExplanation
    state: PreprocessState
    foreground: np.ndarray
    slice_foreground: torch.Tensor


def check_explain_options(bundle: ModelBundle, noise_level: int, scale: float, steps: int | None) -> None:
    """Range checks with one-line errors: 1 <= L < T, 1 <= K <= L, 0 <= s <= MAX_SCALE."""
    ddim_timesteps(noise_level, steps, bundle.schedule.num_timesteps)
    if not (0 <= scale <= MAX_SCALE) or not np.isfinite(scale):
        raise ConfigError(f"scale must be in 0..{MAX_SCALE:g}, got {scale}")


def p_healthy(bundle: ModelBundle, x: torch.Tensor) -> torch.Tensor:
    """p(healthy | x, t=0) for clean slices x (N, C, S, S) -> (N,)."""
    t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    with torch.no_grad():
        return torch.softmax(bundle.classifier(x, t).float(), dim=1)[:, HEALTHY]


def explain_slices(
    bundle: ModelBundle,
    x: torch.Tensor,
    noise_level: int,
    scale: float,
    steps: int | None = None,
    batch_size: int = 32,
    amp: bool = True,
    progress: SliceProgress | None = None,
) -> SliceExplanation:
    """Explain model-size slices x (N, C, S, S) batch by batch on the bundle's device."""
    check_explain_options(bundle, noise_level, scale, steps)
    device = next(bundle.unet.parameters()).device
    unet, classifier, schedule = bundle.unet, bundle.classifier, bundle.schedule

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return unet(x_t, t).float()

    guided = guided_eps_fn(eps_fn, classifier_grad_fn(classifier, HEALTHY), schedule, scale)
    outputs, before, after = [], [], []
    for start in range(0, x.shape[0], batch_size):
        batch = x[start : start + batch_size].to(device)
        x_L = ddim_encode(eps_fn, batch, schedule, noise_level, steps)
        x_healthy = ddim_decode(guided, x_L, schedule, noise_level, steps)
        outputs.append(x_healthy.cpu())
        before.append(p_healthy(bundle, batch).cpu())
        after.append(p_healthy(bundle, x_healthy).cpu())
        if progress is not None:
            progress(min(start + batch_size, x.shape[0]), x.shape[0])
    x_healthy_all = torch.cat(outputs) if outputs else x.clone()
    return SliceExplanation(
        x=x,
        x_healthy=x_healthy_all,
        anomaly_map=(x - x_healthy_all).abs().sum(dim=1),
        p_healthy_before=torch.cat(before) if before else torch.zeros(0),
        p_healthy_after=torch.cat(after) if after else torch.zeros(0),
    )


def explain_scan(
    bundle: ModelBundle,
    scan: Scan,
    noise_level: int,
    scale: float,
    steps: int | None = None,
    batch_size: int = 32,
    brainmask: np.ndarray | None = None,
    amp: bool = True,
    progress: SliceProgress | None = None,
) -> ScanExplanation:
    """Preprocess a scan as in training, explain its foreground slices, map results to its grid.

    The anomaly map is restricted to the foreground (the brain mask when given, else the
    intensity threshold used by preprocessing): differences in the background mean nothing.
    """
    cfg = bundle.config.data
    if scan.data.shape[0] != cfg.image_channels:
        raise InputError(
            f"{scan.sources[0]}: the model expects {cfg.image_channels} channel(s), the scan has {scan.data.shape[0]}"
        )
    check_explain_options(bundle, noise_level, scale, steps)
    state = fit_preprocess(scan.data, scan.affine, cfg, brainmask=brainmask, source=str(scan.sources[0]))
    x = to_slices(scan.data, state, cfg)
    result = explain_slices(bundle, x, noise_level, scale, steps, batch_size, amp, progress)
    foreground = brainmask.astype(bool) if brainmask is not None else foreground_mask(scan.data)
    slice_foreground = mask_to_slices(foreground, state)
    result = replace(result, anomaly_map=result.anomaly_map * slice_foreground)
    anomaly_map = to_input_grid(result.anomaly_map[:, None], state, fill=0.0)[0]
    delta = denormalise_delta(to_input_grid(result.x_healthy - result.x, state, fill=0.0), state)
    return ScanExplanation(
        anomaly_map=np.where(foreground, np.maximum(anomaly_map, 0.0), 0.0).astype(np.float32),
        healthy=(scan.data + delta).astype(np.float32),
        slices=result,
        state=state,
        foreground=foreground,
        slice_foreground=slice_foreground,
    )
