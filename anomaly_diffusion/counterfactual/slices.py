"""Model-size slices (N, C, S, S) through the networks: encode to x_L, decode to counterfactuals (batch
by batch on the model's device), the masked decoding's soft mask, p(healthy), and the map."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from anomaly_diffusion.counterfactual.denoisers import BundleSource, denoiser, encoding_denoiser, guided_denoiser
from anomaly_diffusion.counterfactual.settings import CPU_BATCH_SIZE, ExplainSettings
from anomaly_diffusion.diffusion.decoding import DECODINGS, NEEDS_MASK, DecodeContext, Decoded
from anomaly_diffusion.diffusion.encoding import ENCODINGS, EncodeContext
from anomaly_diffusion.diffusion.guidance import GUIDANCE
from anomaly_diffusion.diffusion.masking import region_mask
from anomaly_diffusion.labels import HEALTHY, PATHOLOGICAL
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.residuals import residual_map
from anomaly_diffusion.runtime import model_device, to_device
from anomaly_diffusion.scans import SliceExplanation

SliceProgress = Callable[[int, int], None]
"""(slices done, slices in total)."""


def encode_slices(bundle: ModelBundle, x: torch.Tensor, settings: ExplainSettings) -> torch.Tensor:
    """x_L of model-size slices x (N, C, S, S) by the settings' `ENCODINGS` entry, on the model's device.

    Several decodings (e.g. guidance scales) can share one encoding (`ExplainSettings.encode_key`).
    """
    device = model_device(bundle)
    context = EncodeContext(settings.seed, settings.noise_cell, settings.batch_size, lambda t: to_device(t, device))
    eps_fn = encoding_denoiser(bundle, settings.amp, settings.encode_label)
    x_L = ENCODINGS.get(settings.encoding).function(eps_fn, x, bundle.schedule, settings.grid, context)
    return to_device(x_L, device)


def guidance_mask(bundle: ModelBundle, x_0: torch.Tensor, settings: ExplainSettings) -> torch.Tensor:
    """The soft lesion mask M (N, 1, S, S) of masked decoding, from the classifier at t = 0 on slices x_0 (N, C, S, S).

    `masking.region_mask` of the `lse` head's region probabilities, gated by p(pathological | x_0).
    """
    device = model_device(bundle)
    source = BundleSource(bundle, settings.amp)
    masks = []
    with torch.inference_mode():
        for start in range(0, x_0.shape[0], settings.batch_size):
            x = to_device(x_0[start : start + settings.batch_size], device)
            t = torch.zeros(x.shape[0], dtype=torch.long, device=device)
            region = torch.sigmoid(source.region_logits(x, t))
            pathological = torch.softmax(source.logits(x, t), dim=1)[:, PATHOLOGICAL]
            masks.append(region_mask(region, pathological, tuple(x.shape[2:]), settings.mask).cpu())
    return torch.cat(masks) if masks else torch.zeros(0, 1, *x_0.shape[2:])


def counterfactuals(
    bundle: ModelBundle,
    x_L: torch.Tensor,
    settings: ExplainSettings,
    progress: SliceProgress | None = None,
    x_0: torch.Tensor | None = None,
) -> Decoded:
    """x_healthy = decode(eps_hat, x_L, L), eps_hat guided towards HEALTHY with scale s; (N, C, S, S) on the CPU.

    The decoding is the settings' `DECODINGS` entry; x_0, the slices that were encoded (N, C, S, S),
    is needed by those that compare with the input (THOR) or mask by the classifier's view of it
    (masked). Only the classifier's input gradient is computed (see `classifier_grad_fn`); with
    s = 0, or a target that needs no gradient (classifier-free), the decoding runs under
    `torch.inference_mode`. `Decoded.plain` is the plain reconstruction where the decoding walked it.
    """
    device = model_device(bundle)
    guided = guided_denoiser(bundle, settings.scale, settings.amp, settings.guidance, settings.smooth)
    no_gradients = settings.scale == 0 or not GUIDANCE.get(settings.guidance).function.needs_gradients
    decoder = DECODINGS.get(settings.decoding).function
    if x_0 is None and settings.decoding != "ddim":
        raise ValueError(f"decoding {settings.decoding!r} needs the encoded slices x_0")
    inputs = x_0 if x_0 is not None else x_L
    masks = guidance_mask(bundle, inputs, settings) if settings.decoding in NEEDS_MASK else None
    plain_eps = denoiser(bundle, settings.amp)
    size = settings.batch_size
    healthy, plain = [], []
    for start in range(0, x_L.shape[0], size):
        batch = to_device(x_L[start : start + size], device)
        mask = to_device(masks[start : start + size], device) if masks is not None else None
        originals = to_device(inputs[start : start + size], device)
        context = DecodeContext(originals, plain_eps, settings.harmonisation, mask)
        if no_gradients:
            with torch.inference_mode():
                decoded = decoder(guided, batch, bundle.schedule, settings.grid, context)
        else:
            decoded = decoder(guided, batch, bundle.schedule, settings.grid, context)
        healthy.append(decoded.healthy.cpu())
        if decoded.plain is not None:
            plain.append(decoded.plain.cpu())
        if progress is not None:
            progress(min(start + size, x_L.shape[0]), x_L.shape[0])
    if not healthy:
        return Decoded(x_L.clone())
    return Decoded(torch.cat(healthy), torch.cat(plain) if plain else None)


def decode_slices(
    bundle: ModelBundle,
    x_L: torch.Tensor,
    settings: ExplainSettings,
    progress: SliceProgress | None = None,
    x_0: torch.Tensor | None = None,
) -> torch.Tensor:
    """The counterfactuals x_healthy (N, C, S, S) of `counterfactuals`."""
    return counterfactuals(bundle, x_L, settings, progress, x_0).healthy


def region_period(bundle: ModelBundle) -> int | None:
    """The period in pixels of an `lse` classifier's region grid (image size / regions per side); None otherwise."""
    classifier, cfg = bundle.classifier, bundle.config
    if classifier is None or cfg.classifier.pooling != "lse":
        return None
    device = model_device(bundle)
    probe = torch.zeros(1, cfg.data.image_channels, cfg.data.image_size, cfg.data.image_size, device=device)
    with torch.inference_mode():
        regions = classifier.region_logits(probe, torch.zeros(1, dtype=torch.long, device=device)).shape[1]
    side = round(regions**0.5)
    return cfg.data.image_size // side if side * side == regions and cfg.data.image_size % side == 0 else None


def p_healthy(bundle: ModelBundle, x: torch.Tensor) -> torch.Tensor:
    """p(healthy | x, t=0) for clean slices x (N, C, S, S) -> (N,); NaN for a classifier-free model (no classifier)."""
    if bundle.classifier is None:
        return torch.full((x.shape[0],), float("nan"), device=x.device)
    t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    with torch.no_grad():
        return torch.softmax(bundle.classifier(x, t).float(), dim=1)[:, HEALTHY]


def p_healthy_batched(bundle: ModelBundle, x: torch.Tensor, batch_size: int = CPU_BATCH_SIZE) -> torch.Tensor:
    """`p_healthy` of (N, C, S, S) slices, batch by batch on the bundle's device -> (N,) on the CPU."""
    device = model_device(bundle)
    parts = [
        p_healthy(bundle, to_device(x[s : s + batch_size], device)).cpu() for s in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0)


def slice_explanation(
    bundle: ModelBundle,
    x: torch.Tensor,
    x_healthy: torch.Tensor,
    settings: ExplainSettings,
    x_plain: torch.Tensor | None = None,
) -> SliceExplanation:
    """Assemble a `SliceExplanation` from inputs and counterfactuals (adds the map and p(healthy)).

    `x_plain`, the plain reconstruction of the same x_L, is needed when `settings.pairing` is 'reconstruction'.
    """
    explanation = SliceExplanation(
        x=x,
        x_healthy=x_healthy,
        anomaly_map=torch.zeros(0),
        p_healthy_before=p_healthy_batched(bundle, x, settings.batch_size),
        p_healthy_after=p_healthy_batched(bundle, x_healthy, settings.batch_size),
        x_plain=x_plain,
    )
    return with_residual(explanation, settings)


def with_residual(explanation: SliceExplanation, settings: ExplainSettings) -> SliceExplanation:
    """The same explanation with the map made by the settings' residual, pairing and channel (no network is run)."""
    reference = explanation.x
    if settings.pairing == "reconstruction":
        if explanation.x_plain is None:
            raise ValueError("pairing 'reconstruction' needs the plain reconstruction (x_plain)")
        reference = explanation.x_plain
    anomaly_map = residual_map(reference, explanation.x_healthy, settings.residual, settings.residual_channel)
    return replace(explanation, anomaly_map=anomaly_map)
