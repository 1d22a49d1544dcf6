"""The method grammar of `adiff evaluate --methods` in one place: the fixed methods (guided, unguided,
paper, intensity[:C]) and named settings `NAME:KEY=VALUE;...` whose keys are the `KEYS` table.

The CLI's `--methods` help (`grammar_help`) and the benchmark's grid keys (`GRID_KEYS`) are made
from `KEYS`; a test checks docs/evaluation.md lists every key. The keys `enc=`, `dec=`, `r=` and
`g=` take the names of the `ENCODINGS`, `DECODINGS`, `RESIDUALS` and `GUIDANCE` registries, so a
newly registered choice is a method key without any change here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from anomaly_diffusion.config import Config
from anomaly_diffusion.counterfactual.settings import PAIRINGS
from anomaly_diffusion.diffusion.decoding import DECODINGS, NEEDS_MASK
from anomaly_diffusion.diffusion.encoding import ENCODINGS, is_stochastic
from anomaly_diffusion.diffusion.guidance import GUIDANCE
from anomaly_diffusion.diffusion.harmonise import Harmonisation
from anomaly_diffusion.diffusion.masking import MaskSettings
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.evaluation.methods import MAX_MEDIAN_FILTER, PAPER, Method
from anomaly_diffusion.residuals import RESIDUALS

_CUSTOM = re.compile(r"^(?P<name>[A-Za-z][\w.-]*):(?P<args>.+)$")
_PAIRING_SHORT = {"input": "in", "reconstruction": "rec"}
_RESIDUAL_SHORT = {"positive": "pos", "negative": "neg"}


@dataclass(frozen=True)
class MethodKey:
    """One key of a named method `NAME:KEY=VALUE;...`.

    Attributes:
        name: the key as typed.
        value: 'int', 'float', 'levels' (L: ints joined by '+'), 'steps' (K: an int, or full) or
            'choice' (a registry's or a fixed list's names, given by `choices`).
        meaning: what it sets, for the CLI help and the docs.
        example: a typical value.
        grid: whether a benchmark's val grid may vary it (the keys of a diffusion method).
        choices: the names a 'choice' key takes (a registry's `names`, so a newly registered one is a value).
        aliases: short forms of some names (full name -> short).
    """

    name: str
    value: str
    meaning: str
    example: str
    grid: bool = True
    choices: Callable[[], Sequence[str]] | None = None
    aliases: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        """The values a 'choice' key takes, short forms where they exist."""
        return [self.aliases.get(n, n) for n in (self.choices() if self.choices else ())]


KEYS: tuple[MethodKey, ...] = (
    MethodKey("L", "levels", "the noise level; 100+200 averages the maps of several levels", "100"),
    MethodKey("s", "float", "the guidance scale (0: the unguided reconstruction; w for classifier-free)", "300"),
    MethodKey("K", "steps", "DDIM steps (full: every one of L)", "25"),
    MethodKey("g", "choice", "the guidance target", "regions", choices=GUIDANCE.names),
    MethodKey("r", "choice", "the map's residual", "pos", choices=RESIDUALS.names, aliases=_RESIDUAL_SHORT),
    MethodKey("m", "int", "this method's in-plane median filter size", "5"),
    MethodKey("enc", "choice", "the encoding x_0 -> x_L", "ddim", choices=ENCODINGS.names),
    MethodKey("n", "int", "draws of a stochastic encoding whose maps are averaged", "4"),
    MethodKey("f", "int", "the coarse/simplex noise's cell in pixels", "4"),
    MethodKey("dec", "choice", "the decoding x_L -> x_healthy", "masked", choices=DECODINGS.names),
    MethodKey("hl", "int", "THOR's harmonised levels (dec=thor)", "4"),
    MethodKey("ht", "float", "THOR's map threshold (dec=thor)", "0.5"),
    MethodKey("hd", "int", "THOR's mask dilation in pixels (dec=thor)", "1"),
    MethodKey(
        "p",
        "choice",
        "pairing: the map compares the counterfactual with the input or with the plain reconstruction of the same x_L",
        "rec",
        choices=lambda: PAIRINGS,
        aliases=_PAIRING_SHORT,
    ),
    MethodKey("rc", "int", "the map from this channel alone", "0"),
    MethodKey("sm", "float", "the classifier gradient's Gaussian low-pass, std in pixels", "4"),
    MethodKey("mt", "float", "the masked decoding's mask threshold (dec=masked)", "0.3"),
    MethodKey("md", "int", "the masked decoding's mask dilation in pixels (dec=masked)", "2"),
    MethodKey("ms", "float", "the masked decoding's mask blur in pixels (dec=masked)", "2"),
    MethodKey("gt", "float", "the slice gate: slices with p(pathological) below it are not decoded", "0.5"),
    MethodKey("c", "int", "an intensity method's channel (with m only: NAME:c=0;m=5)", "0", grid=False),
)
"""Every key of the method grammar, in the order the help lists them: parsing, the CLI help, the docs'
check and the benchmark's grid keys all come from this one table."""

_BY_NAME = {k.name: k for k in KEYS}
GRID_KEYS = tuple(k.name for k in KEYS if k.grid)
"""The keys a benchmark's val grid may vary."""


def grammar_help() -> str:
    """The `--methods` help: the fixed methods, then every key of a named method with its values."""
    keys = "; ".join(
        f"{k.name}= {k.meaning}" + (f" ({'/'.join(k.names())})" if k.value == "choice" else "") for k in KEYS
    )
    return (
        "Comma-separated: guided (the model's explain settings), unguided (s=0), paper (L=500, s=100, K=L), "
        "intensity[:C] (raw intensity of channel C), or NAME:KEY=VALUE;... a named diffusion setting "
        f"whose keys left out come from guided. Keys: {keys}."
    )


def _one_of(names: Sequence[str]) -> str:
    """'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _choice(spec: str, key: MethodKey, text: str) -> str:
    """A registry name given in full or by its short alias; the error lists the short forms."""
    names = key.choices() if key.choices else ()
    full = {**{n: n for n in names}, **{short: name for name, short in key.aliases.items()}}
    if text not in full:
        raise ConfigError(f"method {spec!r}: {key.name} must be {_one_of(key.names())}, got {text!r}")
    return full[text]


def _parse_value(spec: str, name: str, text: str) -> Any:
    key, text = _BY_NAME[name], text.strip()
    try:
        if key.value == "levels":
            return [int(float(part)) for part in text.split("+")]
        if key.value == "steps":
            return None if text in ("", "full", "none") else int(float(text))
        if key.value == "choice":
            return _choice(spec, key, text)
        if key.value == "int":
            return int(text)
        return float(text)
    except ValueError as exc:
        raise ConfigError(f"method {spec!r}: {name}={text!r} is not a number") from exc


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
    - `NAME:L=300,s=50,K=30`: a named diffusion method with the keys of `KEYS`; keys left out come
      from guided (and the bundle's explain config).
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
        if not sep or key not in _BY_NAME:
            raise ConfigError(f"method {spec!r}: expected keys {', '.join(_BY_NAME)} as KEY=VALUE, got {item!r}")
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
