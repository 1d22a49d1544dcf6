"""The detectors an evaluation compares, and their command-line grammar.

- diffusion methods: encode to L (no guidance), decode with guidance scale s (s = 0 is the
  unguided-reconstruction baseline); a method may average the maps of several L (an ensemble) or
  of several draws of a stochastic encoding;
- `intensity`: the normalised intensity of one channel (a strong detector on BraTS FLAIR).

The keys `enc=`, `dec=`, `r=` and `g=` take the names of the `ENCODINGS`, `DECODINGS`, `RESIDUALS`
and `GUIDANCE` registries, so a newly registered choice is a method key without any change here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from anomaly_diffusion.config import Config
from anomaly_diffusion.counterfactual.settings import PAIRINGS, ExplainSettings, explain_settings, resolve_batch_size
from anomaly_diffusion.diffusion.decoding import DECODINGS, NEEDS_MASK
from anomaly_diffusion.diffusion.encoding import ENCODINGS, NOISE_CELL_ENCODINGS, is_stochastic
from anomaly_diffusion.diffusion.guidance import GUIDANCE
from anomaly_diffusion.diffusion.harmonise import Harmonisation
from anomaly_diffusion.diffusion.masking import MaskSettings
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.residuals import RESIDUALS


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


_CUSTOM = re.compile(r"^(?P<name>[A-Za-z][\w.-]*):(?P<args>.+)$")
_KEYS: tuple[str, ...] = ("L", "s", "K", "enc", "n", "m", "r", "g", "c", "dec", "hl", "ht", "hd", "f")
_KEYS += ("p", "rc", "sm", "mt", "md", "ms", "gt")
_PAIRING_SHORT = {"input": "in", "reconstruction": "rec"}
_RESIDUAL_SHORT = {"positive": "pos", "negative": "neg"}


def _one_of(names: Sequence[str]) -> str:
    """'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _choice(spec: str, key: str, text: str, names: Sequence[str], aliases: dict[str, str] | None = None) -> str:
    """A registry name given in full or by its short alias; the error lists the short forms."""
    full = {**{n: n for n in names}, **{short: name for name, short in (aliases or {}).items()}}
    if text not in full:
        shown = [(aliases or {}).get(n, n) for n in names]
        raise ConfigError(f"method {spec!r}: {key} must be {_one_of(shown)}, got {text!r}")
    return full[text]


def _parse_value(spec: str, key: str, text: str) -> Any:
    text = text.strip()
    try:
        if key == "L":
            return [int(float(part)) for part in text.split("+")]
        if key == "K":
            return None if text in ("", "full", "none") else int(float(text))
        if key == "enc":
            return _choice(spec, key, text, ENCODINGS.names())
        if key == "r":
            return _choice(spec, key, text, RESIDUALS.names(), _RESIDUAL_SHORT)
        if key == "g":
            return _choice(spec, key, text, GUIDANCE.names())
        if key == "dec":
            return _choice(spec, key, text, DECODINGS.names())
        if key == "p":
            return _choice(spec, key, text, PAIRINGS, _PAIRING_SHORT)
        if key in ("n", "m", "c", "hl", "hd", "f", "rc", "md"):
            return int(text)
        return float(text)
    except ValueError as exc:
        raise ConfigError(f"method {spec!r}: {key}={text!r} is not a number") from exc


def parse_method(spec: str, cfg: Config) -> Method:
    """A method from its command-line spec (see `_parse_method`), with its supervision regime."""
    method = _parse_method(spec, cfg)
    if method.kind == "intensity":
        regime = "none"
    elif method.scale > 0 or cfg.data.ddpm_train_on == "healthy":
        regime = "weak"
    else:
        regime = "unsupervised"
    return replace(method, regime=regime)


def _intensity(spec: str, name: str, channel: int, channels: int, median: int | None = None) -> Method:
    if not 0 <= channel < channels:
        raise ConfigError(f"method {spec!r}: channel must be 0..{channels - 1} for this model")
    return Method(name, "intensity", channel=channel, median=median)


def _parse_method(spec: str, cfg: Config) -> Method:
    """A method from its command-line spec.

    - `guided`: the bundle's explain defaults (L, s, K); `unguided`: the same with s = 0;
    - `paper`: L = 500, s = 100, K = L, slice guidance, abs residual (Wolleb 2022);
    - `intensity` or `intensity:C` (channel C);
    - `NAME:L=300,s=50,K=30`: a named diffusion method. Keys: L (`100+200+300` averages the maps
      of several levels), s, K, enc (an encoding: `ddim`, `noise`, `coarse`, `simplex`), n (draws
      averaged with a stochastic encoding), f (the coarse/simplex noise's cell in pixels), dec (a
      decoding: `ddim` or `thor`), hl, ht, hd (THOR's harmonised levels, map threshold, dilation),
      m (a median filter for this method), r (the map's residual: abs, pos or neg), g (a guidance
      target: slice or regions), p (pairing: in, the input, or rec, the plain reconstruction of the
      same x_L), rc (the map from one channel), sm (the classifier gradient's Gaussian low-pass in
      pixels), mt, md, ms (masked decoding's mask threshold, dilation and blur), gt (the slice gate:
      slices with p(pathological) below it are not decoded); missing ones come from guided (and the
      bundle's explain config).
      `NAME:c=0,m=5` is the intensity of channel c, median-filtered.
    """
    e = cfg.explain
    spec = spec.strip()
    if spec == "guided":
        return Method("guided", "diffusion", e.noise_level, e.scale, e.steps, residual=e.residual, guidance=e.guidance)
    if spec == "unguided":
        return Method("unguided", "diffusion", e.noise_level, 0.0, e.steps, residual=e.residual)
    if spec == "paper":
        p = PAPER
        return Method(
            "paper",
            "diffusion",
            p.noise_level,
            p.scale,
            p.steps,
            residual=p.residual,
            guidance=p.guidance,
            decoding="ddim",
        )
    channels = cfg.data.image_channels
    if spec == "intensity" or spec.startswith("intensity:"):
        channel_text = spec.partition(":")[2] or "0"
        if not channel_text.isdigit():
            raise ConfigError(f"method {spec!r}: channel must be 0..{channels - 1} for this model")
        channel = int(channel_text)
        return _intensity(spec, "intensity" if channel == 0 else f"intensity:{channel}", channel, channels)
    match = _CUSTOM.match(spec)
    if match is None:
        raise ConfigError(f"unknown method {spec!r}; use guided, unguided, paper, intensity[:C] or NAME:L=..,s=..,K=..")
    values: dict[str, Any] = {"L": [e.noise_level], "s": e.scale, "K": e.steps, "enc": "ddim", "n": 1, "m": None}
    values.update({"r": e.residual, "g": e.guidance})
    given = set()
    for item in match.group("args").split(","):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in _KEYS:
            raise ConfigError(f"method {spec!r}: expected keys {', '.join(_KEYS)} as KEY=VALUE, got {item!r}")
        values[key] = _parse_value(spec, key, text)
        given.add(key)
    if values["m"] is not None and not 0 <= values["m"] <= MAX_MEDIAN_FILTER:
        raise ConfigError(f"method {spec!r}: m (median filter) must be in 0..{MAX_MEDIAN_FILTER}, got {values['m']}")
    if "c" in given:  # a named intensity method, e.g. 'flair-m5:c=0,m=5'
        if given - {"c", "m"}:
            raise ConfigError(f"method {spec!r}: an intensity method (c=) takes only c and m")
        return _intensity(spec, match.group("name"), values["c"], channels, values["m"])
    if values["n"] < 1 or (values["n"] > 1 and not is_stochastic(values["enc"])):
        stochastic = "/".join(n for n in ENCODINGS.names() if is_stochastic(n))
        raise ConfigError(f"method {spec!r}: n (draws) must be >= 1, and > 1 only with enc={stochastic}")
    if "f" in given and values["f"] < 1:
        raise ConfigError(f"method {spec!r}: f (noise cell) must be >= 1 pixel, got {values['f']}")
    harmonisation = None
    if given & {"hl", "ht", "hd"}:
        h = e.harmonise
        try:
            harmonisation = Harmonisation(
                levels=values.get("hl", h.levels),
                threshold=float(values.get("ht", h.threshold)),
                dilation=values.get("hd", h.dilation),
                soft=h.soft,
            )
        except ConfigError as exc:
            raise ConfigError(f"method {spec!r}: {exc}") from exc
        if values.get("dec", e.decoding) != "thor":
            raise ConfigError(f"method {spec!r}: hl, ht and hd are THOR's settings: add dec=thor")
    mask = None
    if given & {"mt", "md", "ms"}:
        m = e.mask
        try:
            mask = MaskSettings(
                threshold=float(values.get("mt", m.threshold)),
                dilation=values.get("md", m.dilation),
                sigma=float(values.get("ms", m.sigma)),
            )
        except ConfigError as exc:
            raise ConfigError(f"method {spec!r}: {exc}") from exc
        if values.get("dec", e.decoding) not in NEEDS_MASK:
            raise ConfigError(f"method {spec!r}: mt, md and ms are masked decoding's settings: add dec=masked")
    level, *more = values["L"]
    return Method(
        match.group("name"),
        "diffusion",
        level,
        float(values["s"]),
        values["K"],
        more_levels=tuple(more),
        encoding=values["enc"],
        seeds=values["n"],
        median=values["m"],
        residual=values["r"],
        guidance=values["g"],
        decoding=values.get("dec"),
        harmonisation=harmonisation,
        noise_cell=values.get("f"),
        pairing=values.get("p"),
        residual_channel=values.get("rc"),
        smooth=values.get("sm"),
        mask=mask,
        gate=values.get("gt"),
    )


def split_method_specs(text: str) -> list[str]:
    """Method specs from the command line: ',' separates methods and ';' a named method's keys.

    'NAME:L=1,s=2' cut into 'NAME:L=1' and 's=2' by the ',' split is joined again.
    """
    specs = [m.strip().replace(";", ",") for m in text.split(",") if m.strip()]
    joined: list[str] = []
    for spec in specs:
        if joined and "=" in spec and ":" not in spec and ":" in joined[-1]:
            joined[-1] += "," + spec
        else:
            joined.append(spec)
    return joined


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
