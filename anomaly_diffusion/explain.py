"""Explain a scan: DDIM-encode without guidance, decode with guidance towards healthy.

    x_L = ddim_encode(eps_theta, x, L)                                         (no guidance)
    x_healthy = ddim_decode(eps_hat, x_L, L),  eps_hat = eps - s sqrt(1 - alpha_bar_t) grad log p(healthy | x_t)
                  or, classifier-free:      eps_hat = eps(null) + w (eps(healthy) - eps(null))
    anomaly map = sum_c |x_c - x_healthy_c|                                     (Wolleb 2022)
                  or sum_c max(x_c - x_healthy_c, 0)                (`residual: positive`, bright lesions)

The encoding (`ENCODINGS`: DDIM inversion, or forward noising with white, coarse or simplex noise)
and the decoding (`DECODINGS`: DDIM, THOR's harmonised DDIM, or Dif-fuse's masked lockstep DDIM) are
named choices. The map compares the counterfactual with the input, or (`pairing: reconstruction`)
with the plain DDIM reconstruction of the same x_L, so the reconstruction error both share cancels;
a classifier gradient may be low-passed on the image grid (`smooth`, no lattice). An ensemble
(`explain_ensemble`) averages the maps of several levels or draws; their spread is its uncertainty.

Every option lives in one immutable `ExplainSettings`, made and checked once by
`explain_settings`. Slices are processed in batches on the model's device; the map is computed at
model resolution in normalised units and mapped back onto the input's voxel grid (`scans.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from anomaly_diffusion.data.io import Scan
from anomaly_diffusion.diffusion.decoding import DECODINGS, NEEDS_MASK, DecodeContext, Decoded
from anomaly_diffusion.diffusion.guidance import GUIDANCE, check_guidance
from anomaly_diffusion.diffusion.harmonise import Harmonisation
from anomaly_diffusion.diffusion.masking import MaskSettings, region_mask
from anomaly_diffusion.diffusion.noise import coarse_noise, simplex_noise
from anomaly_diffusion.diffusion.sampling import DdimGrid, ddim_encode, ddim_grid
from anomaly_diffusion.diffusion.schedule import q_sample
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.labels import HEALTHY, NULL_LABEL, PATHOLOGICAL
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.registry import Registry
from anomaly_diffusion.residuals import RESIDUALS, residual_map
from anomaly_diffusion.runtime import autocast, model_device, to_device
from anomaly_diffusion.scans import ScanExplanation, SliceExplanation, assemble_scan, prepare_scan

SliceProgress = Callable[[int, int], None]
"""(slices done, slices in total)."""

MAX_SCALE = 1e5
CPU_BATCH_SIZE = 32
MAX_AUTO_BATCH = 512
PAIRINGS = ("input", "reconstruction")
"""What the counterfactual is compared with for the map: the input x, or the plain reconstruction of x_L."""


@dataclass(frozen=True)
class ExplainSettings:
    """Everything one explanation depends on; made (and checked) only by `explain_settings`.

    Attributes:
        grid: the DDIM levels tau_1..tau_K = L shared by encode and decode.
        scale: s, the guidance scale (0 = unguided reconstruction); w for classifier-free guidance.
        guidance: a `GUIDANCE` target.
        encode_label: a classifier-free model's label for the DDIM inversion ('null' or 'pathological').
        residual: a `RESIDUALS` entry, how the map is made.
        encoding: an `ENCODINGS` entry, how x_0 becomes x_L.
        seed: the draw of a stochastic encoding.
        batch_size: slices per batch.
        amp: mixed precision where the hardware has it (`runtime.autocast`).
        decoding: a `DECODINGS` entry, how x_L becomes x_healthy.
        harmonisation: THOR's levels, threshold and dilation (used by decoding 'thor').
        noise_cell: cell size in pixels of the 'coarse' and 'simplex' encodings' noise.
        pairing: a `PAIRINGS` entry: the map is residual(x - x_healthy) or residual(x_plain - x_healthy).
        residual_channel: the map from this channel alone; None sums the channels.
        smooth: std in pixels of the Gaussian that low-passes the classifier gradient (0: none).
        mask: the soft lesion mask of decoding 'masked'.
        gate: slices the classifier calls healthy, p(pathological | x, t=0) < gate, are not decoded:
            their counterfactual is the input and their map 0 (0: every slice is decoded).
    """

    grid: DdimGrid
    scale: float
    guidance: str
    residual: str
    encoding: str = "ddim"
    seed: int = 0
    batch_size: int = CPU_BATCH_SIZE
    amp: bool = True
    encode_label: str = "null"
    decoding: str = "ddim"
    harmonisation: Harmonisation = field(default_factory=Harmonisation)
    noise_cell: int = 4
    pairing: str = "input"
    residual_channel: int | None = None
    smooth: float = 0.0
    mask: MaskSettings = field(default_factory=MaskSettings)
    gate: float = 0.0

    @property
    def noise_level(self) -> int:
        """L."""
        return self.grid.noise_level

    @property
    def encode_key(self) -> tuple[object, ...]:
        """Settings with equal keys share one encoding."""
        cell = self.noise_cell if self.encoding in NOISE_CELL_ENCODINGS else 0
        label = self.encode_label if not is_stochastic(self.encoding) else "null"  # forward noising has no label
        return (self.grid, self.encoding, self.seed if is_stochastic(self.encoding) else 0, cell, label)

    @property
    def decode_key(self) -> tuple[object, ...]:
        """Settings with equal keys share one decoding (the residual only changes the map)."""
        harmonised = self.harmonisation if self.decoding == "thor" else None
        mask = self.mask if self.decoding in NEEDS_MASK else None
        guided = (self.guidance, self.smooth) if self.scale > 0 else "none"
        return (self.encode_key, self.scale, guided, self.decoding, harmonised, mask, self.gate)

    @property
    def plain_key(self) -> tuple[object, ...]:
        """The decode key of the plain reconstruction of the same x_L (what `pairing: reconstruction` compares with)."""
        return replace(self, scale=0.0, decoding="ddim").decode_key


def explain_settings(
    bundle: ModelBundle,
    *,
    noise_level: int | None = None,
    steps: int | None = None,
    scale: float | None = None,
    guidance: str | None = None,
    residual: str | None = None,
    encoding: str = "ddim",
    seed: int = 0,
    batch_size: int | None = None,
    steps_given: bool = False,
    decoding: str | None = None,
    harmonisation: Harmonisation | None = None,
    noise_cell: int | None = None,
    pairing: str | None = None,
    residual_channel: int | None = None,
    smooth: float | None = None,
    mask: MaskSettings | None = None,
    gate: float | None = None,
) -> ExplainSettings:
    """The bundle's `explain` defaults with the given values replacing them, checked once.

    Checks, with one-line errors: 1 <= L < T and 1 <= K <= L (`ddim_grid`), 0 <= s <= MAX_SCALE,
    a registered guidance target this classifier can give, a registered residual, encoding and
    decoding, a noise cell of at least one pixel, a pairing, a residual channel the model has, a
    smoothing >= 0, a masked decoding only with an `lse` classifier, a gate in [0, 1) only with a classifier.
    `steps` None takes the bundle's `explain.steps` unless `steps_given` (then None means K = L).
    """
    e = bundle.config.explain
    encoding = ENCODINGS.check(encoding, "encoding")
    cell = noise_cell if noise_cell is not None else e.noise_cell
    if cell is None:  # Kascenas 2023: 16x16 coarse noise for 128x128 slices; AnoDDPM: 64 px octaves at 256 px
        cell = max(bundle.config.data.image_size // (4 if encoding == "simplex" else 16), 1)
    if cell < 1:
        raise ConfigError(f"noise cell must be >= 1 pixel, got {cell}")
    h = e.harmonise
    harmonisation = harmonisation or Harmonisation(h.levels, h.threshold, h.dilation, h.soft)
    level = e.noise_level if noise_level is None else noise_level
    grid = ddim_grid(level, steps if steps is not None or steps_given else e.steps, bundle.schedule.num_timesteps)
    s = e.scale if scale is None else scale
    if not (0 <= s <= MAX_SCALE) or not np.isfinite(s):
        raise ConfigError(f"scale must be in 0..{MAX_SCALE:g}, got {s}")
    target = check_guidance(guidance or e.guidance, bundle.config.classifier.pooling, bundle.config.method)
    decoding = DECODINGS.check(decoding or e.decoding, "decoding")
    if decoding in NEEDS_MASK and (bundle.config.method != "classifier" or bundle.config.classifier.pooling != "lse"):
        raise ConfigError(f"decoding={decoding} needs a classifier with pooling=lse (its regions make the mask)")
    pairing = pairing or e.pairing
    if pairing not in PAIRINGS:
        raise ConfigError(f"pairing must be {' or '.join(PAIRINGS)}, got {pairing!r}")
    channel = residual_channel if residual_channel is not None else e.residual_channel
    if channel is not None and not 0 <= channel < bundle.config.data.image_channels:
        raise ConfigError(f"residual channel must be 0..{bundle.config.data.image_channels - 1}, got {channel}")
    sigma = e.smooth if smooth is None else smooth
    if not (sigma >= 0 and np.isfinite(sigma)):
        raise ConfigError(f"smoothing must be >= 0 pixels, got {sigma}")
    gate = e.gate if gate is None else gate
    if not 0 <= gate < 1:
        raise ConfigError(f"gate must be in [0, 1), got {gate}")
    if gate > 0 and bundle.classifier is None:
        raise ConfigError("gate needs a classifier (p(pathological | x)); this model is classifier-free")
    m = e.mask
    return ExplainSettings(
        grid=grid,
        scale=float(s),
        guidance=target,
        residual=RESIDUALS.check(residual or e.residual),
        encoding=encoding,
        seed=seed,
        batch_size=resolve_batch_size(bundle, batch_size),
        amp=bundle.config.train.amp,
        encode_label=e.encode_label,
        decoding=decoding,
        harmonisation=harmonisation,
        noise_cell=cell,
        pairing=pairing,
        residual_channel=channel,
        smooth=float(sigma),
        mask=mask or MaskSettings(m.threshold, m.dilation, m.sigma),
        gate=float(gate),
    )


def _in_mixed_precision(
    bundle: ModelBundle, network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], amp: bool
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    device = model_device(bundle)

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return network(x_t, t).float()

    return fn


def denoiser(bundle: ModelBundle, amp: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps_theta(x_t, t) (B, C, S, S) in fp32, computed under autocast when `amp` (see `runtime.autocast`).

    A classifier-free model's unconditional denoiser: eps(x_t, t, null).
    """
    return _in_mixed_precision(bundle, bundle.unet, amp)


def conditional_denoiser(
    bundle: ModelBundle, amp: bool
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps(x_t, t, y) of a classifier-free model (labels y (B,)), in fp32 under autocast when `amp`."""
    if bundle.config.method != "classifier_free":
        raise ConfigError("this model has no label-conditional denoiser (method=classifier, not classifier_free)")
    device = model_device(bundle)

    def fn(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            eps: torch.Tensor = bundle.unet(x_t, t, y)
            return eps.float()

    return fn


def encoding_denoiser(
    bundle: ModelBundle, settings: ExplainSettings
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The denoiser of the DDIM inversion: eps_theta, or a classifier-free model's eps(x_t, t, encode_label)."""
    if bundle.config.method != "classifier_free" or settings.encode_label == "null":
        return denoiser(bundle, settings.amp)
    conditional = conditional_denoiser(bundle, settings.amp)
    label = PATHOLOGICAL if settings.encode_label == "pathological" else NULL_LABEL

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return conditional(x_t, t, torch.full((x_t.shape[0],), label, dtype=torch.long, device=x_t.device))

    return fn


class _BundleSource:
    """The bundle's networks as a `guidance.GuidanceSource`, each under the denoiser's autocast."""

    def __init__(self, bundle: ModelBundle, amp: bool) -> None:
        self.bundle, self.amp = bundle, amp
        self.eps = denoiser(bundle, amp)

    def _classifier(self) -> Any:
        if self.bundle.classifier is None:
            raise ConfigError("this model is classifier-free: it has no classifier to guide with")
        return self.bundle.classifier

    def logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _in_mixed_precision(self.bundle, self._classifier(), self.amp)(x_t, t)

    def region_logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _in_mixed_precision(self.bundle, self._classifier().region_logits, self.amp)(x_t, t)

    def conditional_eps(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return conditional_denoiser(self.bundle, self.amp)(x_t, t, y)


def guided_denoiser(
    bundle: ModelBundle, scale: float, amp: bool, guidance: str, smooth: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps_hat(x_t, t): the denoiser guided towards HEALTHY with scale s (plain eps_theta when s = 0).

    `guidance` names a `GUIDANCE` target: 'slice' follows grad log p(healthy | x_t); 'regions'
    follows grad sum_p log p(region p healthy | x_t) of the multiple-instance classifier; 'cfg'
    is classifier-free guidance with weight w = scale (w = 0: eps(null), the same as s = 0).
    `smooth` low-passes a classifier gradient with a Gaussian of that std in pixels.
    """
    if scale == 0:
        return denoiser(bundle, amp)
    return GUIDANCE.get(guidance).function.build(_BundleSource(bundle, amp), bundle.schedule, scale, smooth)


def resolve_batch_size(bundle: ModelBundle, batch_size: int | None = None) -> int:
    """The given batch size, else the model's `explain.batch_size`, else (0) `auto_batch_size` (a GPU probe)."""
    return batch_size or bundle.config.explain.batch_size or auto_batch_size(bundle)


def auto_batch_size(bundle: ModelBundle, fraction: float = 0.6, probe: int = 4) -> int:
    """Slices per batch that fit in `fraction` of the free GPU memory (measured on one guided step); 32 on CPU.

    batch = min(max(fraction * free // bytes per slice, 1), MAX_AUTO_BATCH), with the bytes per slice
    the peak memory of one guided step on `probe` slices, divided by `probe`.
    """
    device = model_device(bundle)
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    per_slice = max(_guided_step_bytes(bundle, device, probe) / probe, 1.0)
    return int(min(max(fraction * free // per_slice, 1), MAX_AUTO_BATCH))


def _guided_step_bytes(bundle: ModelBundle, device: torch.device, probe: int) -> float:
    """Peak CUDA memory of one guided denoiser step on `probe` slices, above what was allocated before."""
    cfg = bundle.config.data
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    x = to_device(torch.randn(probe, cfg.image_channels, cfg.image_size, cfg.image_size), device)
    t = torch.full((probe,), 1, dtype=torch.long, device=device)
    guided = guided_denoiser(bundle, 1.0, True, bundle.config.explain.guidance)
    with torch.no_grad():
        guided(x, t)
    return float(torch.cuda.max_memory_allocated(device) - before)


Encoder = Callable[[ModelBundle, torch.Tensor, ExplainSettings], torch.Tensor]
"""(bundle, x_0 (N, C, S, S), settings) -> x_L (N, C, S, S) on the model's device."""


def _ddim_inversion(bundle: ModelBundle, x: torch.Tensor, settings: ExplainSettings) -> torch.Tensor:
    """x_L = ddim_encode(eps_theta, x, L), batch by batch, under `torch.inference_mode` (no guidance)."""
    device = model_device(bundle)
    eps_fn = encoding_denoiser(bundle, settings)
    encoded = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], settings.batch_size):
            batch = to_device(x[start : start + settings.batch_size], device)
            encoded.append(ddim_encode(eps_fn, batch, bundle.schedule, settings.grid))
    return torch.cat(encoded) if encoded else x.clone()


NoiseFn = Callable[[tuple[int, ...], torch.Generator, ExplainSettings], torch.Tensor]
"""(shape (N, C, S, S), seeded generator, settings) -> eps of that shape, unit variance per pixel."""


def forward_noising(noise_fn: NoiseFn) -> Encoder:
    """The encoding x_L = q(x_L | x_0; eps) = sqrt(alpha_bar_L) x_0 + sqrt(1 - alpha_bar_L) eps (Ho 2020, eq. 4).

    eps = noise_fn(shape, generator seeded with `settings.seed`, settings). No network evaluations:
    the decoding then samples a healthy image near x_0 rather than inverting it exactly.
    """

    def encode(bundle: ModelBundle, x: torch.Tensor, settings: ExplainSettings) -> torch.Tensor:
        noise = noise_fn(tuple(x.shape), torch.Generator().manual_seed(settings.seed), settings)
        t = torch.full((x.shape[0],), settings.noise_level, dtype=torch.long)
        return to_device(q_sample(bundle.schedule, x, t, noise), model_device(bundle))

    return encode


ENCODINGS: Registry[Encoder] = Registry("encoding")
_STOCHASTIC: set[str] = set()
NOISE_CELL_ENCODINGS = ("coarse", "simplex")
"""The encodings that use `ExplainSettings.noise_cell`."""


def register_noise_encoding(name: str, noise_fn: NoiseFn, description: str) -> None:
    """Register a stochastic encoding (forward noising with `noise_fn`): a new draw per seed."""
    ENCODINGS.register(name, forward_noising(noise_fn), description)
    _STOCHASTIC.add(name)


def is_stochastic(encoding: str) -> bool:
    """Whether an encoding draws noise (its seed matters: an ensemble can average several draws)."""
    return encoding in _STOCHASTIC


ENCODINGS.register("ddim", _ddim_inversion, "deterministic DDIM inversion (the paper)")
register_noise_encoding(
    "noise",
    lambda shape, generator, settings: torch.randn(shape, generator=generator),
    "forward noising x_L ~ q(x_L | x_0), one draw per seed",
)
register_noise_encoding(
    "coarse",
    lambda shape, generator, settings: coarse_noise(shape, settings.noise_cell, generator),
    "forward noising with coarse Gaussian noise (drawn every noise_cell pixels, upsampled; Kascenas 2023)",
)
register_noise_encoding(
    "simplex",
    lambda shape, generator, settings: simplex_noise(shape, settings.noise_cell, generator),
    "forward noising with 6-octave simplex noise (coarsest octave noise_cell pixels; Wyatt 2022, AnoDDPM)",
)


def encode_slices(bundle: ModelBundle, x: torch.Tensor, settings: ExplainSettings) -> torch.Tensor:
    """x_L of model-size slices x (N, C, S, S) by the settings' encoding, on the model's device.

    Several decodings (e.g. guidance scales) can share one encoding (`ExplainSettings.encode_key`).
    """
    return ENCODINGS.get(settings.encoding).function(bundle, x, settings)


def guidance_mask(bundle: ModelBundle, x_0: torch.Tensor, settings: ExplainSettings) -> torch.Tensor:
    """The soft lesion mask M (N, 1, S, S) of masked decoding, from the classifier at t = 0 on slices x_0 (N, C, S, S).

    `masking.region_mask` of the `lse` head's region probabilities, gated by p(pathological | x_0).
    """
    device = model_device(bundle)
    source = _BundleSource(bundle, settings.amp)
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


class SliceDecodings:
    """The encodings, decodings and explanations of one stack of slices x (N, C, S, S), shared by settings.

    Settings with equal `encode_key` share one encoding, with equal `decode_key` one decoding; the
    residual, pairing and channel only change the map. The plain reconstruction that
    `pairing: reconstruction` compares with is the unguided DDIM decoding (`plain_key`): taken from
    the cache (an s = 0 candidate, or a masked decoding that walked it beside the guided one), else
    decoded once. Explain, its ensembles and evaluate all go through this one cache.
    With `gate` > 0 only the slices the classifier calls pathological are decoded (`kept`).
    """

    def __init__(self, bundle: ModelBundle, x: torch.Tensor) -> None:
        self.bundle, self.x = bundle, x
        self._p_healthy: torch.Tensor | None = None
        self._encoded: dict[object, torch.Tensor] = {}
        self._decoded: dict[object, Decoded] = {}
        self._plain: dict[object, torch.Tensor] = {}
        self._explained: dict[object, SliceExplanation] = {}

    def encoded(self, settings: ExplainSettings) -> torch.Tensor:
        """x_L of the settings' encoding."""
        if settings.encode_key not in self._encoded:
            self._encoded[settings.encode_key] = encode_slices(self.bundle, self.x, settings)
        return self._encoded[settings.encode_key]

    def kept(self, settings: ExplainSettings) -> torch.Tensor:
        """(N,) bool: the slices the settings decode, p(pathological | x, t=0) >= gate (all without a gate)."""
        if settings.gate <= 0:
            return torch.ones(self.x.shape[0], dtype=torch.bool)
        if self._p_healthy is None:
            self._p_healthy = p_healthy_batched(self.bundle, self.x, settings.batch_size)
        return (1 - self._p_healthy) >= settings.gate

    def decoded(self, settings: ExplainSettings, progress: SliceProgress | None = None) -> Decoded:
        """The settings' counterfactuals (and the plain reconstruction where the decoding walked it).

        Slices a gate leaves out keep the input as counterfactual and as plain reconstruction.
        """
        key = settings.decode_key
        if key not in self._decoded:
            x_L, keep = self.encoded(settings), self.kept(settings)
            if bool(keep.all()):
                decoded = counterfactuals(self.bundle, x_L, settings, progress, x_0=self.x)
            else:
                part = counterfactuals(self.bundle, x_L[keep], settings, progress, x_0=self.x[keep])
                healthy = self.x.clone()
                healthy[keep] = part.healthy
                plain = None
                if part.plain is not None:
                    plain = self.x.clone()
                    plain[keep] = part.plain
                decoded = Decoded(healthy, plain)
            self._decoded[key] = decoded
            if decoded.plain is not None:
                self._plain.setdefault(settings.plain_key, decoded.plain)
            if key == settings.plain_key:
                self._plain.setdefault(key, decoded.healthy)
        return self._decoded[key]

    def is_decoded(self, settings: ExplainSettings) -> bool:
        """Whether the settings' decoding is already in the cache."""
        return settings.decode_key in self._decoded

    def reconstruction(self, settings: ExplainSettings) -> torch.Tensor:
        """The plain DDIM reconstruction of the settings' x_L, (N, C, S, S)."""
        if settings.plain_key not in self._plain:
            self.decoded(replace(settings, scale=0.0, decoding="ddim"))
        return self._plain[settings.plain_key]

    def explanation(self, settings: ExplainSettings, progress: SliceProgress | None = None) -> SliceExplanation:
        """The settings' explanation: counterfactual, map (residual, pairing, channel), p(healthy) before/after."""
        key = settings.decode_key
        decoded = self.decoded(settings, progress)
        if key not in self._explained:
            self._explained[key] = slice_explanation(
                self.bundle, self.x, decoded.healthy, replace(settings, pairing="input"), decoded.plain
            )
        explanation = self._explained[key]
        if settings.pairing == "reconstruction" and explanation.x_plain is None:
            explanation = self._explained[key] = replace(explanation, x_plain=self.reconstruction(settings))
        explained = with_residual(explanation, settings)
        keep = self.kept(settings)
        if not bool(keep.all()):
            explained.anomaly_map[~keep] = 0.0  # a slice the gate calls healthy has no anomaly
        return explained


def explain_slices(
    bundle: ModelBundle, x: torch.Tensor, settings: ExplainSettings, progress: SliceProgress | None = None
) -> SliceExplanation:
    """Explain model-size slices x (N, C, S, S): encode, guided decode, map, p(healthy) before/after."""
    return SliceDecodings(bundle, x).explanation(settings, progress)


@dataclass(frozen=True)
class EnsembleExplanation:
    """The explanation of an ensemble of settings (levels, draws) of the same slices.

    Attributes:
        mean: its map is the mean of the members' maps; x_healthy and p(healthy) after are the
            first member's (as `adiff evaluate` does for an ensemble method).
        spread: (N, S, S), the per-pixel standard deviation of the members' maps (ddof = 0: zero
            where they agree, and for a single member).
        members: how many maps were averaged.
    """

    mean: SliceExplanation
    spread: torch.Tensor
    members: int


def explain_ensemble(
    bundle: ModelBundle,
    x: torch.Tensor,
    plans: Sequence[ExplainSettings],
    progress: SliceProgress | None = None,
) -> EnsembleExplanation:
    """Explain slices x (N, C, S, S) with every member of an ensemble; mean map and its spread.

    Members with equal `encode_key` share one encoding and with equal `decode_key` one decoding.
    `progress` counts slices over all distinct decodings.
    """
    if not plans:
        raise ValueError("an ensemble needs at least one member")
    decodings = len({p.decode_key for p in plans})
    cache = SliceDecodings(bundle, x)
    maps = []
    done_keys: set[object] = set()
    for plan in plans:
        offset = len(done_keys) * x.shape[0]
        done_keys.add(plan.decode_key)

        def step(done: int, total: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + done, total * decodings)

        maps.append(cache.explanation(plan, None if cache.is_decoded(plan) else step).anomaly_map)
    stacked = torch.stack(maps)
    mean = replace(cache.explanation(plans[0]), anomaly_map=stacked.mean(dim=0))
    return EnsembleExplanation(mean, stacked.std(dim=0, correction=0), len(plans))


@dataclass(frozen=True)
class ScanEnsemble:
    """An ensemble's explanation of a scan: the mean map's `ScanExplanation` and the spread on the input's grid.

    Attributes:
        explanation: as `explain_scan`'s, with the ensemble's mean map.
        uncertainty: (X, Y, Z), the members' per-voxel standard deviation on the input grid (0 outside
            the foreground and the explained slices).
        members: how many maps were averaged.
    """

    explanation: ScanExplanation
    uncertainty: np.ndarray
    members: int


def explain_scan_ensemble(
    bundle: ModelBundle,
    scan: Scan,
    plans: Sequence[ExplainSettings],
    brainmask: np.ndarray | None = None,
    progress: SliceProgress | None = None,
) -> ScanEnsemble:
    """`explain_scan` with an ensemble (`explain_ensemble`): the mean map and its spread, both on the scan's grid."""
    prepared = prepare_scan(bundle.config.data, scan, brainmask)
    ensemble = explain_ensemble(bundle, prepared.x, plans, progress)
    explanation = assemble_scan(scan, prepared, ensemble.mean)
    spread = assemble_scan(scan, prepared, replace(ensemble.mean, anomaly_map=ensemble.spread)).anomaly_map
    return ScanEnsemble(explanation, spread, ensemble.members)


def explain_scan(
    bundle: ModelBundle,
    scan: Scan,
    settings: ExplainSettings,
    brainmask: np.ndarray | None = None,
    progress: SliceProgress | None = None,
) -> ScanExplanation:
    """Preprocess a scan as in training, explain its foreground slices, map results to its grid.

    The anomaly map is restricted to the foreground (the brain mask when given, else the
    intensity threshold used by preprocessing): differences in the background mean nothing.
    """
    prepared = prepare_scan(bundle.config.data, scan, brainmask)
    return assemble_scan(scan, prepared, explain_slices(bundle, prepared.x, settings, progress))
