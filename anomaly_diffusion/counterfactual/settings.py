"""One immutable `ExplainSettings` for everything an explanation depends on, made and checked once by
`explain_settings` from a bundle's `explain` defaults and the caller's values; the batch size."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from anomaly_diffusion.counterfactual.denoisers import guided_denoiser
from anomaly_diffusion.diffusion.decoding import DECODINGS, NEEDS_MASK
from anomaly_diffusion.diffusion.encoding import ENCODINGS, NOISE_CELL_ENCODINGS, is_stochastic
from anomaly_diffusion.diffusion.guidance import check_guidance
from anomaly_diffusion.diffusion.harmonise import Harmonisation
from anomaly_diffusion.diffusion.masking import MaskSettings
from anomaly_diffusion.diffusion.sampling import DdimGrid, ddim_grid
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.residuals import RESIDUALS
from anomaly_diffusion.runtime import model_device, to_device

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
