"""The detectors an evaluation compares (their command-line grammar is `grammar.py`).

- diffusion methods: encode to L (no guidance), decode with guidance scale s (s = 0 is the
  unguided-reconstruction baseline); a method may average the maps of several L (an ensemble) or
  of several draws of a stochastic encoding;
- `intensity`: the normalised intensity of one channel (a strong detector on BraTS FLAIR).

The keys `enc=`, `dec=`, `r=` and `g=` take the names of the `ENCODINGS`, `DECODINGS`, `RESIDUALS`
and `GUIDANCE` registries, so a newly registered choice is a method key without any change here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from anomaly_diffusion.counterfactual.settings import ExplainSettings, explain_settings, resolve_batch_size
from anomaly_diffusion.diffusion.encoding import NOISE_CELL_ENCODINGS, is_stochastic
from anomaly_diffusion.diffusion.harmonise import Harmonisation
from anomaly_diffusion.diffusion.masking import MaskSettings
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.models.bundle import ModelBundle


@dataclass(frozen=True)
class _Paper:
    noise_level: int = 500
    scale: float = 100.0
    steps: int | None = None
    guidance: str = "slice"
    residual: str = "abs"


PAPER = _Paper()
"""Wolleb et al. 2022 on BraTS: L = 500, every step (K = L), s = 100, slice guidance, abs residual."""

MAX_MEDIAN_FILTER = 15
"""Largest in-plane median filter size, for `--median-filter` and a method's `m=`."""

REGIME_TEXT = {
    "weak": "slice labels only (the classifier, or choosing the DDPM's tumour-free training slices)",
    "unsupervised": "images only, no labels",
    "none": "no training",
}
REGIMES = tuple(REGIME_TEXT)
"""Supervision, as the tables group it; no method here uses lesion masks in training."""


@dataclass(frozen=True)
class Method:
    """One detector in the comparison.

    Attributes:
        name: its row name in the tables.
        kind: 'diffusion' (encode to L, decode with scale s in K steps) or 'intensity'.
        noise_level, scale, steps: L, s, K of a diffusion method (K None = L).
        channel: the channel of an intensity method.
        more_levels: further noise levels whose maps are averaged with L's (a multi-L ensemble).
        encoding: an `ENCODINGS` name: 'ddim' (deterministic inversion, the paper), or a stochastic
            one, x_L ~ q(x_L | x_0) with white ('noise'), 'coarse' or 'simplex' noise, one draw per seed.
        seeds: with a stochastic encoding, how many draws' maps are averaged.
        decoding: a `DECODINGS` name ('ddim', 'thor'); None: the bundle's `explain.decoding`.
        harmonisation: THOR's settings; None: the bundle's `explain.harmonise`.
        noise_cell: the coarse/simplex noise's cell in pixels; None: the bundle's `explain.noise_cell`.
        pairing: 'input' or 'reconstruction' (the paired residual); None: the bundle's `explain.pairing`.
        residual_channel: the map from one channel; None: the bundle's `explain.residual_channel`.
        smooth: the classifier gradient's Gaussian low-pass in pixels; None: the bundle's `explain.smooth`.
        mask: the masked decoding's mask settings; None: the bundle's `explain.mask`.
        gate: slices with p(pathological) below it are not decoded; None: the bundle's `explain.gate`.
        median: this method's in-plane median filter size (None: the evaluation's).
        residual: a `RESIDUALS` name; None: the bundle's `explain.residual`.
        guidance: a `GUIDANCE` name; None: the bundle's `explain.guidance`.
        regime: the supervision it uses (`REGIMES`); set by `parse_method` from the bundle's config.
        plans: the checked `ExplainSettings` of each (level, draw), set by `bind_methods`.
    """

    name: str
    kind: Literal["diffusion", "intensity"]
    noise_level: int = 0
    scale: float = 0.0
    steps: int | None = None
    channel: int = 0
    more_levels: tuple[int, ...] = ()
    encoding: str = "ddim"
    seeds: int = 1
    median: int | None = None
    residual: str | None = None
    guidance: str | None = None
    regime: str = ""
    plans: tuple[ExplainSettings, ...] = ()
    decoding: str | None = None
    harmonisation: Harmonisation | None = None
    noise_cell: int | None = None
    pairing: str | None = None
    residual_channel: int | None = None
    smooth: float | None = None
    mask: MaskSettings | None = None
    gate: float | None = None

    @property
    def levels(self) -> tuple[int, ...]:
        """Every noise level whose map goes into this method's map."""
        return (self.noise_level, *self.more_levels)

    def describe(self) -> str:
        """A short human description."""
        if self.kind == "intensity":
            text = f"raw normalised intensity of channel {self.channel}"
        else:
            guidance = "unguided reconstruction" if self.scale == 0 else f"guided s={self.scale:g}"
            levels = "+".join(str(level) for level in self.levels)
            text = f"{guidance}, L={levels}, K={self.steps or self.noise_level}"
            if is_stochastic(self.encoding):
                kind = "" if self.encoding == "noise" else f" with {self.encoding} noise"
                cell = self.plans[0].noise_cell if self.plans else self.noise_cell
                if self.encoding in NOISE_CELL_ENCODINGS and cell is not None:
                    kind += f" (cell {cell} px)"
                text += f", noised to L (DDPM forward){kind}, mean of {self.seeds} draw(s)"
            elif self.encoding != "ddim":
                text += f", {self.encoding} encoding"
            decoding = self.plans[0].decoding if self.plans else self.decoding
            if decoding == "thor":
                h = self.plans[0].harmonisation if self.plans else self.harmonisation
                text += ", THOR-harmonised" + (
                    f" at {h.levels} level(s), threshold {h.threshold:g}, dilation {h.dilation}"
                    + (", soft" if h.soft else "")
                    if h is not None
                    else ""
                )
            elif decoding == "masked":
                m = self.plans[0].mask if self.plans else self.mask
                text += ", masked lockstep decoding" + (
                    f" (mask threshold {m.threshold:g}, dilation {m.dilation}, sigma {m.sigma:g})" if m else ""
                )
            elif decoding not in (None, "ddim"):
                text += f", {decoding} decoding"
            pairing = self.plans[0].pairing if self.plans else self.pairing
            if pairing == "reconstruction":
                text += ", paired with the plain reconstruction"
            channel = self.plans[0].residual_channel if self.plans else self.residual_channel
            if channel is not None:
                text += f", channel {channel} only"
            smooth = self.plans[0].smooth if self.plans else self.smooth
            if smooth and self.scale > 0:
                text += f", gradient smoothed (sigma {smooth:g} px)"
            gate = self.plans[0].gate if self.plans else self.gate
            if gate:
                text += f", slices with p(pathological) < {gate:g} not decoded"
            if self.guidance not in (None, PAPER.guidance) and self.scale > 0:  # the paper's choices go unsaid
                text += f", {self.guidance} guidance"
            if self.residual not in (None, PAPER.residual):
                text += f", {self.residual} residual"
        return text if self.median is None else f"{text}, median filter {self.median}"


def bind_methods(methods: Sequence[Method], bundle: ModelBundle, batch_size: int | None = None) -> list[Method]:
    """Unique names, and each diffusion method's checked `ExplainSettings` per (level, draw), before any work."""
    names = [m.name for m in methods]
    if not methods:
        raise ConfigError("no methods to evaluate")
    if len(set(names)) != len(names):
        raise ConfigError(f"method names must be unique, got {names}")
    batch_size = resolve_batch_size(bundle, batch_size)  # once: on a GPU the automatic choice runs a probe step
    bound = []
    for m in methods:
        if m.kind == "diffusion":
            try:
                plans = tuple(
                    explain_settings(
                        bundle,
                        noise_level=level,
                        steps=m.steps,
                        steps_given=True,
                        scale=m.scale,
                        guidance=m.guidance,
                        residual=m.residual,
                        encoding=m.encoding,
                        seed=seed,
                        batch_size=batch_size,
                        decoding=m.decoding,
                        harmonisation=m.harmonisation,
                        noise_cell=m.noise_cell,
                        pairing=m.pairing,
                        residual_channel=m.residual_channel,
                        smooth=m.smooth,
                        mask=m.mask,
                        gate=m.gate,
                    )
                    for level in m.levels
                    for seed in range(m.seeds)
                )
            except ConfigError as exc:
                raise ConfigError(f"method {m.name!r}: {exc}") from exc
            m = replace(m, plans=plans)
        bound.append(m)
    return bound
