"""Explain a scan: DDIM-encode without guidance, decode with classifier guidance towards healthy.

    x_L = ddim_encode(eps_theta, x, L)                                         (no guidance)
    x_healthy = ddim_decode(eps_hat, x_L, L),  eps_hat = eps - s sqrt(1 - alpha_bar_t) grad log p(healthy | x_t)
    anomaly map = sum_c |x_c - x_healthy_c|                                     (Wolleb 2022)
                  or sum_c max(x_c - x_healthy_c, 0)                (`residual: positive`, bright lesions)

Slices are processed in batches on the model's device; the map is computed at model resolution
in normalised units and mapped back onto the input's voxel grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, cast

import numpy as np
import torch
from torch import nn

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
from anomaly_diffusion.diffusion.guidance import classifier_grad_fn, guided_eps_fn, region_grad_fn
from anomaly_diffusion.diffusion.sampling import ddim_decode, ddim_encode
from anomaly_diffusion.diffusion.schedule import ddim_timesteps, q_sample
from anomaly_diffusion.errors import ConfigError, InputError
from anomaly_diffusion.labels import HEALTHY
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.models.networks import NoiseAwareClassifier
from anomaly_diffusion.training import autocast

SliceProgress = Callable[[int, int], None]
"""(slices done, slices in total)."""

MAX_SCALE = 1e5

Residual = Literal["abs", "positive", "negative"]
RESIDUALS: tuple[Residual, ...] = ("abs", "positive", "negative")
Guidance = Literal["slice", "regions"]
GUIDANCES: tuple[Guidance, ...] = ("slice", "regions")


@dataclass(frozen=True)
class SliceExplanation:
    """Explanation of a batch of model-size slices.

    Attributes:
        x: inputs, (N, C, S, S), normalised units.
        x_healthy: healthy counterfactuals, same shape.
        anomaly_map: the residual summed over channels (`residual_map`), (N, S, S).
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


def check_explain_options(
    bundle: ModelBundle, noise_level: int, scale: float, steps: int | None, guidance: str | None = None
) -> None:
    """Checks with one-line errors: 1 <= L < T, 1 <= K <= L, 0 <= s <= MAX_SCALE, a guidance this classifier has."""
    ddim_timesteps(noise_level, steps, bundle.schedule.num_timesteps)
    if not (0 <= scale <= MAX_SCALE) or not np.isfinite(scale):
        raise ConfigError(f"scale must be in 0..{MAX_SCALE:g}, got {scale}")
    if guidance is not None and guidance not in GUIDANCES:
        raise ConfigError(f"guidance must be one of {', '.join(GUIDANCES)}, got {guidance!r}")
    pooling = bundle.config.classifier.pooling
    if guidance == "regions" and pooling != "lse":
        raise ConfigError(f"guidance=regions needs a classifier with pooling=lse; this model's pools by {pooling}")


def p_healthy(bundle: ModelBundle, x: torch.Tensor) -> torch.Tensor:
    """p(healthy | x, t=0) for clean slices x (N, C, S, S) -> (N,)."""
    t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    with torch.no_grad():
        return torch.softmax(bundle.classifier(x, t).float(), dim=1)[:, HEALTHY]


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to the model's device, channels-last (NHWC): cuDNN and oneDNN run 2D convolutions
    fastest so (measured on CPU: 1.6x for the brats64 UNet in fp32, 1.2x in bf16)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def prepare_for_inference(bundle: ModelBundle, compile_networks: bool = False, fp32: bool = False) -> ModelBundle:
    """The bundle made ready to explain: channels-last weights, optionally `torch.compile`d networks.

    Compiling costs minutes up front (and again for a new batch size): worth it for many volumes.
    `fp32` turns mixed precision off (the returned bundle's `config.train.amp` is False), for
    results that do not depend on the hardware's bf16 support.
    """
    if fp32:
        config = bundle.config
        bundle = replace(
            bundle, config=config.model_copy(update={"train": config.train.model_copy(update={"amp": False})})
        )
    unet, classifier = bundle.unet, bundle.classifier
    unet = unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if next(classifier.parameters()).device.type == "cuda":
        # not on CPU: there GroupNorm's backward (the guidance gradient) is 2.7x slower in NHWC
        classifier = classifier.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if compile_networks:
        unet = cast(nn.Module, torch.compile(unet))
        classifier = cast(NoiseAwareClassifier, torch.compile(classifier))
    return replace(bundle, unet=unet, classifier=classifier)


CPU_BATCH_SIZE = 32
MAX_AUTO_BATCH = 512


def auto_batch_size(bundle: ModelBundle, fraction: float = 0.6, probe: int = 4) -> int:
    """Slices per batch that fit in `fraction` of the free GPU memory (measured on one guided step); 32 on CPU."""
    device = next(bundle.unet.parameters()).device
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    cfg = bundle.config.data
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    x = _to_device(torch.randn(probe, cfg.image_channels, cfg.image_size, cfg.image_size), device)
    t = torch.full((probe,), 1, dtype=torch.long, device=device)
    guided = guided_denoiser(bundle, 1.0, True)
    with torch.no_grad():
        guided(x, t)
    per_slice = max((torch.cuda.max_memory_allocated(device) - before) / probe, 1.0)
    return int(min(max(fraction * free // per_slice, 1), MAX_AUTO_BATCH))


def _in_mixed_precision(
    bundle: ModelBundle, network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], amp: bool
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    device = next(bundle.unet.parameters()).device

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return network(x_t, t).float()

    return fn


def denoiser(bundle: ModelBundle, amp: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps_theta(x_t, t) (B, C, S, S) in fp32, computed under autocast when `amp` (see `training.autocast`)."""
    return _in_mixed_precision(bundle, bundle.unet, amp)


def classifier_logits(bundle: ModelBundle, amp: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The classifier's logits (B, 2) under the same autocast as the denoiser (for the guidance gradient)."""
    return _in_mixed_precision(bundle, bundle.classifier, amp)


def region_logits(bundle: ModelBundle, amp: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The `lse` classifier's per-region abnormality logits (B, P), under the denoiser's autocast."""
    return _in_mixed_precision(bundle, bundle.classifier.region_logits, amp)


def guided_denoiser(
    bundle: ModelBundle, scale: float, amp: bool, guidance: Guidance | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps_hat(x_t, t): the denoiser guided towards HEALTHY with scale s (plain eps_theta when s = 0).

    `guidance` (None: the bundle's `explain.guidance`): 'slice' follows grad log p(healthy | x_t);
    'regions' follows grad sum_p log p(region p healthy | x_t) of the multiple-instance classifier.
    """
    guidance = guidance or bundle.config.explain.guidance
    if guidance == "regions":
        grad_fn = region_grad_fn(region_logits(bundle, amp))
    elif guidance == "slice":
        grad_fn = classifier_grad_fn(classifier_logits(bundle, amp), HEALTHY)
    else:
        raise ConfigError(f"guidance must be one of {', '.join(GUIDANCES)}, got {guidance!r}")
    return guided_eps_fn(denoiser(bundle, amp), grad_fn, bundle.schedule, scale)


def encode_slices(
    bundle: ModelBundle,
    x: torch.Tensor,
    noise_level: int,
    steps: int | None = None,
    batch_size: int = 32,
    amp: bool = True,
) -> torch.Tensor:
    """x_L = ddim_encode(eps_theta, x, L) for model-size slices x (N, C, S, S), batch by batch.

    Runs under `torch.inference_mode` (no guidance, no gradients). Returns x_L (N, C, S, S) on
    the model's device, where `decode_slices` takes it without a copy; several decodings (e.g.
    guidance scales) can share one encoding.
    """
    device = next(bundle.unet.parameters()).device
    eps_fn = denoiser(bundle, amp)
    encoded = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            batch = _to_device(x[start : start + batch_size], device)
            encoded.append(ddim_encode(eps_fn, batch, bundle.schedule, noise_level, steps))
    return torch.cat(encoded) if encoded else x.clone()


def noise_slices(bundle: ModelBundle, x: torch.Tensor, noise_level: int, seed: int) -> torch.Tensor:
    """x_L ~ q(x_L | x_0) = sqrt(alpha_bar_L) x_0 + sqrt(1 - alpha_bar_L) eps (Ho 2020, eq. 4), seeded.

    The stochastic alternative to `encode_slices` (no network evaluations): the decoding then
    samples a healthy image near x_0 rather than inverting it exactly. x (N, C, S, S) -> x_L on
    the model's device.
    """
    device = next(bundle.unet.parameters()).device
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.full((x.shape[0],), noise_level, dtype=torch.long)
    return _to_device(q_sample(bundle.schedule, x, t, noise), device)


def decode_slices(
    bundle: ModelBundle,
    x_L: torch.Tensor,
    noise_level: int,
    scale: float,
    steps: int | None = None,
    batch_size: int = 32,
    amp: bool = True,
    progress: SliceProgress | None = None,
    guidance: Guidance | None = None,
) -> torch.Tensor:
    """x_healthy = ddim_decode(eps_hat, x_L, L), eps_hat guided towards HEALTHY with scale s. (N, C, S, S).

    Only the classifier's input gradient is computed (see `classifier_grad_fn`); with s = 0 the
    decoding is plain DDIM and runs under `torch.inference_mode`. `guidance`: see `guided_denoiser`.
    """
    device = next(bundle.unet.parameters()).device
    guided = guided_denoiser(bundle, scale, amp, guidance)
    decoded = []
    for start in range(0, x_L.shape[0], batch_size):
        batch = _to_device(x_L[start : start + batch_size], device)
        if scale == 0:
            with torch.inference_mode():
                decoded.append(ddim_decode(guided, batch, bundle.schedule, noise_level, steps).cpu())
        else:
            decoded.append(ddim_decode(guided, batch, bundle.schedule, noise_level, steps).cpu())
        if progress is not None:
            progress(min(start + batch_size, x_L.shape[0]), x_L.shape[0])
    return torch.cat(decoded) if decoded else x_L.clone()


def p_healthy_batched(bundle: ModelBundle, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """`p_healthy` of (N, C, S, S) slices, batch by batch on the bundle's device -> (N,) on the CPU."""
    device = next(bundle.unet.parameters()).device
    parts = [
        p_healthy(bundle, _to_device(x[s : s + batch_size], device)).cpu() for s in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0)


def residual_map(x: torch.Tensor, x_healthy: torch.Tensor, residual: Residual = "abs") -> torch.Tensor:
    """The anomaly map of inputs x and counterfactuals x_healthy, (N, C, S, S) each -> (N, S, S).

    - abs: sum_c |x_c - x_healthy_c| (Wolleb 2022);
    - positive: sum_c max(x_c - x_healthy_c, 0): only voxels the counterfactual made darker, i.e. where
      the scan is brighter than healthy (lesions hyperintense in FLAIR or T2). A prior on the lesion's
      contrast, not a label: the supervision regime is unchanged;
    - negative: sum_c max(x_healthy_c - x_c, 0), for hypointense lesions.
    """
    difference = x - x_healthy
    if residual == "abs":
        return difference.abs().sum(dim=1)
    if residual == "positive":
        return difference.clamp(min=0).sum(dim=1)
    if residual == "negative":
        return (-difference).clamp(min=0).sum(dim=1)
    raise ConfigError(f"residual must be one of {', '.join(RESIDUALS)}, got {residual!r}")


def slice_explanation(
    bundle: ModelBundle,
    x: torch.Tensor,
    x_healthy: torch.Tensor,
    batch_size: int = 32,
    residual: Residual | None = None,
) -> SliceExplanation:
    """Assemble a `SliceExplanation` from inputs and counterfactuals (adds the map and p(healthy)).

    `residual` None takes the bundle's `explain.residual`.
    """
    return SliceExplanation(
        x=x,
        x_healthy=x_healthy,
        anomaly_map=residual_map(x, x_healthy, residual or bundle.config.explain.residual),
        p_healthy_before=p_healthy_batched(bundle, x, batch_size),
        p_healthy_after=p_healthy_batched(bundle, x_healthy, batch_size),
    )


def explain_slices(
    bundle: ModelBundle,
    x: torch.Tensor,
    noise_level: int,
    scale: float,
    steps: int | None = None,
    batch_size: int = 32,
    amp: bool = True,
    progress: SliceProgress | None = None,
    residual: Residual | None = None,
    guidance: Guidance | None = None,
) -> SliceExplanation:
    """Explain model-size slices x (N, C, S, S): encode, guided decode, map, p(healthy) before/after."""
    check_explain_options(bundle, noise_level, scale, steps)
    x_L = encode_slices(bundle, x, noise_level, steps, batch_size, amp)
    x_healthy = decode_slices(bundle, x_L, noise_level, scale, steps, batch_size, amp, progress, guidance)
    return slice_explanation(bundle, x, x_healthy, batch_size, residual)


@dataclass(frozen=True)
class PreparedScan:
    """A scan preprocessed as in training, ready for the model.

    Attributes:
        state: how it was preprocessed (kept slice indices, crop, intensities).
        x: the kept slices, (N, C, S, S) in normalised units.
        foreground: (X, Y, Z) bool, the brain/foreground mask the scores are restricted to.
        slice_foreground: (N, S, S) bool, the same at model resolution.
    """

    state: PreprocessState
    x: torch.Tensor
    foreground: np.ndarray
    slice_foreground: torch.Tensor


def prepare_scan(bundle: ModelBundle, scan: Scan, brainmask: np.ndarray | None = None) -> PreparedScan:
    """Preprocess a scan with the bundle's data config; the foreground is the brain mask if given."""
    cfg = bundle.config.data
    if scan.data.shape[0] != cfg.image_channels:
        raise InputError(
            f"{scan.sources[0]}: the model expects {cfg.image_channels} channel(s), the scan has {scan.data.shape[0]}"
        )
    state = fit_preprocess(scan.data, scan.affine, cfg, brainmask=brainmask, source=str(scan.sources[0]))
    foreground = brainmask.astype(bool) if brainmask is not None else foreground_mask(scan.data)
    return PreparedScan(state, to_slices(scan.data, state, cfg), foreground, mask_to_slices(foreground, state))


def assemble_scan(scan: Scan, prepared: PreparedScan, result: SliceExplanation) -> ScanExplanation:
    """Restrict a slice explanation's map to the foreground and map it back onto the scan's grid."""
    state = prepared.state
    result = replace(result, anomaly_map=result.anomaly_map * prepared.slice_foreground)
    anomaly_map = to_input_grid(result.anomaly_map[:, None], state, fill=0.0)[0]
    delta = denormalise_delta(to_input_grid(result.x_healthy - result.x, state, fill=0.0), state)
    return ScanExplanation(
        anomaly_map=np.where(prepared.foreground, np.maximum(anomaly_map, 0.0), 0.0).astype(np.float32),
        healthy=(scan.data + delta).astype(np.float32),
        slices=result,
        state=state,
        foreground=prepared.foreground,
        slice_foreground=prepared.slice_foreground,
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
    residual: Residual | None = None,
    guidance: Guidance | None = None,
) -> ScanExplanation:
    """Preprocess a scan as in training, explain its foreground slices, map results to its grid.

    The anomaly map is restricted to the foreground (the brain mask when given, else the
    intensity threshold used by preprocessing): differences in the background mean nothing.
    """
    check_explain_options(bundle, noise_level, scale, steps)
    prepared = prepare_scan(bundle, scan, brainmask)
    result = explain_slices(
        bundle, prepared.x, noise_level, scale, steps, batch_size, amp, progress, residual, guidance
    )
    return assemble_scan(scan, prepared, result)
