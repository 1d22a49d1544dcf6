"""Evaluation of anomaly maps against lesion masks: our method and baselines in one harness.

Every method scores the same voxels of the same volumes: the brain/foreground voxels of the
slices the model sees, on the input's own grid (nothing is scored at model resolution). Methods:

- diffusion methods: encode with DDIM to L (no guidance), decode with guidance scale s (s = 0 is
  the unguided-reconstruction baseline); methods sharing (L, K) share one encoding, and with the
  same s one decoding; a method may average the maps of several L (an ensemble) or encode by
  forward noising (DDPM) with several draws instead of DDIM inversion;
- `intensity`: the normalised intensity of one channel (a strong detector on BraTS FLAIR).

Metrics (pooled over all voxels of the split, never averaged per image unless stated): pixel
AUROC/AUPRC, Dice at per-slice Otsu thresholds (Wolleb 2022's protocol: mean over diseased
slices), Dice at one threshold chosen on other data (a validation split, else leave one volume
out), the best achievable Dice (oracle), Dice at thresholds set on lesion-free slices for a target
false-positive rate, slice-level detection AUROC, results by lesion size, per volume, and
percentile-bootstrap 95% intervals over volumes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from scipy.ndimage import median_filter

from anomaly_diffusion.config import Config
from anomaly_diffusion.data.io import load_scan, read_mask
from anomaly_diffusion.data.manifest import ManifestRow
from anomaly_diffusion.data.transforms import (
    explained_region,
    in_plane_pixel_area,
    mask_to_slices,
    normalise,
    to_plane_stack,
)
from anomaly_diffusion.errors import ConfigError, InputError
from anomaly_diffusion.explain import (
    GUIDANCES,
    Guidance,
    Residual,
    SliceExplanation,
    assemble_scan,
    check_explain_options,
    decode_slices,
    encode_slices,
    noise_slices,
    prepare_scan,
    residual_map,
    slice_explanation,
)
from anomaly_diffusion.metrics import (
    auprc,
    auroc,
    best_dice,
    bootstrap_interval,
    confusion_at,
    counts_metrics,
    dice_counts,
    histogram_counts,
    per_slice_otsu_dice,
    size_bin,
    slice_scores,
    threshold_at_fpr,
)
from anomaly_diffusion.models.bundle import ModelBundle

PAPER = {"noise_level": 500, "scale": 100.0, "steps": None}
"""Wolleb et al. 2022 on BraTS: L = 500, every step (K = L), s = 100."""

HISTOGRAM_BINS = 4096

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
        encoding: 'ddim' (deterministic inversion, the paper) or 'noise' (x_L ~ q(x_L | x_0), the
            DDPM forward process, one draw per seed).
        seeds: with 'noise' encoding, how many draws' maps are averaged.
        median: this method's in-plane median filter size (None: the evaluation's).
        residual: the map's residual (`explain.residual_map`: abs, positive, negative); None: the
            bundle's `explain.residual`.
        guidance: the guidance target (`explain.guided_denoiser`: slice, regions); None: the
            bundle's `explain.guidance`.
        regime: the supervision it uses (`REGIMES`); set by `parse_method` from the bundle's config.
    """

    name: str
    kind: Literal["diffusion", "intensity"]
    noise_level: int = 0
    scale: float = 0.0
    steps: int | None = None
    channel: int = 0
    more_levels: tuple[int, ...] = ()
    encoding: Literal["ddim", "noise"] = "ddim"
    seeds: int = 1
    median: int | None = None
    residual: Residual | None = None
    guidance: Guidance | None = None
    regime: str = ""

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
            if self.encoding == "noise":
                text += f", noised to L (DDPM forward), mean of {self.seeds} draw(s)"
            if self.guidance not in (None, "slice") and self.scale > 0:  # the paper's choices go unsaid
                text += f", {self.guidance} guidance"
            if self.residual not in (None, "abs"):
                text += f", {self.residual} residual"
        return text if self.median is None else f"{text}, median filter {self.median}"


_CUSTOM = re.compile(r"^(?P<name>[A-Za-z][\w.-]*):(?P<args>.+)$")
_KEYS = ("L", "s", "K", "enc", "n", "m", "r", "g", "c")
_RESIDUAL_NAMES: dict[str, Residual] = {
    "abs": "abs",
    "pos": "positive",
    "positive": "positive",
    "neg": "negative",
    "negative": "negative",
}


def _parse_value(spec: str, key: str, text: str) -> Any:
    text = text.strip()
    try:
        if key == "L":
            return [int(float(part)) for part in text.split("+")]
        if key == "K":
            return None if text in ("", "full", "none") else int(float(text))
        if key == "enc":
            if text not in ("ddim", "noise"):
                raise ConfigError(f"method {spec!r}: enc must be ddim or noise, got {text!r}")
            return text
        if key == "r":
            if text not in _RESIDUAL_NAMES:
                raise ConfigError(f"method {spec!r}: r must be abs, pos or neg, got {text!r}")
            return _RESIDUAL_NAMES[text]
        if key == "g":
            if text not in GUIDANCES:
                raise ConfigError(f"method {spec!r}: g must be {' or '.join(GUIDANCES)}, got {text!r}")
            return text
        if key in ("n", "m", "c"):
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


def _parse_method(spec: str, cfg: Config) -> Method:
    """A method from its command-line spec.

    - `guided`: the bundle's explain defaults (L, s, K); `unguided`: the same with s = 0;
    - `paper`: L = 500, s = 100, K = L, slice guidance, abs residual (Wolleb 2022);
    - `intensity` or `intensity:C` (channel C);
    - `NAME:L=300,s=50,K=30`: a named diffusion method. Keys: L (`100+200+300` averages the maps
      of several levels), s, K, enc (`ddim` or `noise`), n (draws averaged with enc=noise), m (a
      median filter for this method), r (the map's residual: abs, pos or neg), g (guidance: slice
      or regions); missing ones come from guided. `NAME:c=0,m=5` is the
      intensity of channel c, median-filtered.
    """
    e = cfg.explain
    spec = spec.strip()
    if spec == "guided":
        return Method("guided", "diffusion", e.noise_level, e.scale, e.steps, residual=e.residual, guidance=e.guidance)
    if spec == "unguided":
        return Method("unguided", "diffusion", e.noise_level, 0.0, e.steps, residual=e.residual)
    if spec == "paper":
        level, scale = int(PAPER["noise_level"]), float(PAPER["scale"])  # type: ignore[arg-type]
        return Method("paper", "diffusion", level, scale, None, residual="abs", guidance="slice")
    if spec == "intensity" or spec.startswith("intensity:"):
        channel_text = spec.partition(":")[2] or "0"
        if not channel_text.isdigit() or int(channel_text) >= cfg.data.image_channels:
            raise ConfigError(f"method {spec!r}: channel must be 0..{cfg.data.image_channels - 1} for this model")
        channel = int(channel_text)
        return Method("intensity" if channel == 0 else f"intensity:{channel}", "intensity", channel=channel)
    match = _CUSTOM.match(spec)
    if match is None:
        raise ConfigError(f"unknown method {spec!r}; use guided, unguided, paper, intensity[:C] or NAME:L=..,s=..,K=..")
    values: dict[str, Any] = {
        "L": [e.noise_level],
        "s": e.scale,
        "K": e.steps,
        "enc": "ddim",
        "n": 1,
        "m": None,
        "r": e.residual,
        "g": e.guidance,
    }
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
        if not 0 <= values["c"] < cfg.data.image_channels:
            raise ConfigError(f"method {spec!r}: channel must be 0..{cfg.data.image_channels - 1} for this model")
        return Method(match.group("name"), "intensity", channel=values["c"], median=values["m"])
    if values["n"] < 1 or (values["n"] > 1 and values["enc"] != "noise"):
        raise ConfigError(f"method {spec!r}: n (draws) must be >= 1, and > 1 only with enc=noise")
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
    )


def check_methods(methods: Sequence[Method], bundle: ModelBundle) -> None:
    """Unique names and in-range options for this bundle, before any work starts."""
    names = [m.name for m in methods]
    if not methods:
        raise ConfigError("no methods to evaluate")
    if len(set(names)) != len(names):
        raise ConfigError(f"method names must be unique, got {names}")
    for m in methods:
        if m.kind == "diffusion":
            try:
                for level in m.levels:
                    check_explain_options(bundle, level, m.scale, m.steps, m.guidance)
            except ConfigError as exc:
                raise ConfigError(f"method {m.name!r}: {exc}") from exc


@dataclass(frozen=True)
class SliceExample:
    """Model-resolution views of one slice for figures (channel 0).

    Attributes:
        x, x_healthy, anomaly_map: (S, S) input, counterfactual and map; truth: (S, S) bool.
    """

    x: np.ndarray
    x_healthy: np.ndarray
    anomaly_map: np.ndarray
    truth: np.ndarray


@dataclass
class VolumeScores:
    """Every method's voxel scores on the scored voxels of one volume.

    Attributes:
        subject: the manifest's subject id.
        truth: (V,) bool, lesion voxels among the scored voxels.
        slice_ids: (V,) slice number of each voxel.
        scores: method name -> (V,) float32 scores.
        pixel_area_mm2: in-plane area of one voxel.
        healthy_slices: slice numbers with fewer than `min_lesion_pixels` lesion voxels.
        p_healthy: method name -> (before, after) mean p(healthy | x, t=0) over slices.
        examples: slice number -> model-resolution views for the first diffusion method.
    """

    subject: str
    truth: np.ndarray
    slice_ids: np.ndarray
    scores: dict[str, np.ndarray]
    pixel_area_mm2: float
    healthy_slices: np.ndarray
    p_healthy: dict[str, tuple[float, float]] = field(default_factory=dict)
    examples: dict[int, SliceExample] = field(default_factory=dict)

    def healthy_voxels(self) -> np.ndarray:
        """(V,) bool: voxels of lesion-free slices."""
        return np.isin(self.slice_ids, self.healthy_slices)


def score_volume(
    bundle: ModelBundle,
    row: ManifestRow,
    methods: Sequence[Method],
    batch_size: int = 32,
    median_size: int = 0,
    amp: bool = True,
    progress: Callable[[str], None] | None = None,
) -> VolumeScores:
    """Explain one manifest volume with every method and keep the scores of its scored voxels.

    Scored voxels: the brain mask (or the foreground threshold) inside the slices the model sees.
    With `median_size` > 1 every map is median-filtered in-plane (size x size) first.
    """
    cfg: Config = bundle.config
    if row.mask is None:
        raise InputError(f"subject {row.subject!r} has no lesion mask: evaluation needs ground truth")
    scan = load_scan(row.images, expected_channels=cfg.data.image_channels)
    truth_volume = read_mask(row.mask, scan)
    brain = read_mask(row.brainmask, scan) if row.brainmask else None
    prepared = prepare_scan(bundle, scan, brain)
    state = prepared.state
    region = to_plane_stack((explained_region(state) & prepared.foreground).astype(np.uint8), state) > 0
    index = np.nonzero(region)
    truth_stack = to_plane_stack(truth_volume.astype(np.uint8), state) > 0

    def voxels(volume: np.ndarray, size: int) -> np.ndarray:
        stack = to_plane_stack(volume.astype(np.float32), state)
        if size > 1:
            stack = median_filter(stack, size=(size, size, 1))
        return stack[index].astype(np.float32)

    lesion_per_slice = truth_stack.sum(axis=(0, 1))
    healthy_slices = np.array([k for k in state.kept if lesion_per_slice[k] < cfg.data.min_lesion_pixels], dtype=int)
    scores: dict[str, np.ndarray] = {}
    p_healthy: dict[str, tuple[float, float]] = {}
    examples: dict[int, SliceExample] = {}
    # methods share encodings (same L, K, encoding, draw) and decodings (and the same s and guidance); the
    # residual only changes the map, which is recomputed from the shared decoding
    encoded: dict[tuple[int, int | None, str, int], torch.Tensor] = {}
    decoded: dict[tuple[int, int | None, str, int, float, str], SliceExplanation] = {}
    truth_slices = mask_to_slices(truth_volume, state)
    normalised: np.ndarray | None = None  # the intensity baselines' input, made once per volume
    for method in methods:
        if progress is not None:
            progress(method.name)
        size = median_size if method.median is None else method.median
        if method.kind == "intensity":
            if normalised is None:
                normalised = normalise(scan.data, state, cfg.data)
            scores[method.name] = voxels(normalised[method.channel], size)
            continue
        parts = []
        for level in method.levels:
            for seed in range(method.seeds):
                key = (level, method.steps, method.encoding, seed)
                if key not in encoded:
                    if method.encoding == "noise":
                        encoded[key] = noise_slices(bundle, prepared.x, level, seed)
                    else:
                        encoded[key] = encode_slices(bundle, prepared.x, level, method.steps, batch_size, amp)
                guidance = method.guidance or cfg.explain.guidance
                decode_key = (*key, method.scale, guidance if method.scale > 0 else "none")
                if decode_key not in decoded:
                    x_healthy = decode_slices(
                        bundle, encoded[key], level, method.scale, method.steps, batch_size, amp, guidance=guidance
                    )
                    decoded[decode_key] = slice_explanation(bundle, prepared.x, x_healthy, batch_size)
                shared = decoded[decode_key]
                residual = method.residual or cfg.explain.residual
                parts.append(replace(shared, anomaly_map=residual_map(shared.x, shared.x_healthy, residual)))
        # an ensemble's map is the mean of its parts' maps; its counterfactual is the first part's
        combined = replace(parts[0], anomaly_map=torch.stack([p.anomaly_map for p in parts]).mean(dim=0))
        explanation = assemble_scan(scan, prepared, combined)
        scores[method.name] = voxels(explanation.anomaly_map, size)
        sl = explanation.slices
        p_healthy[method.name] = (float(sl.p_healthy_before.mean()), float(sl.p_healthy_after.mean()))
        if not examples:
            for i, k in enumerate(state.kept.tolist()):
                examples[k] = SliceExample(
                    x=sl.x[i, 0].numpy(),
                    x_healthy=sl.x_healthy[i, 0].numpy(),
                    anomaly_map=sl.anomaly_map[i].numpy(),
                    truth=truth_slices[i].numpy(),
                )
    return VolumeScores(
        subject=row.subject,
        truth=truth_stack[index],
        slice_ids=index[2].astype(np.int64),
        scores=scores,
        pixel_area_mm2=in_plane_pixel_area(scan.affine, state),
        healthy_slices=healthy_slices,
        p_healthy=p_healthy,
        examples=examples,
    )


@dataclass(frozen=True)
class MethodResult:
    """One method's numbers on a split (see the module docstring for each metric).

    `ci` holds percentile-bootstrap 95% intervals over volumes; `per_volume` and `by_size` map a
    subject or a size bin to its metrics; `dice_at_fpr` maps a target FPR ('1%') to the Dice at
    the threshold set on lesion-free slices, `threshold_at_fpr` to that threshold.
    """

    method: str
    description: str
    regime: str
    auroc: float
    auprc: float
    dice_slice_otsu: float
    dice_chosen: float
    threshold_chosen: float
    dice_best: float
    threshold_best: float
    slice_auroc_max: float
    slice_auroc_mean: float
    dice_at_fpr: dict[str, float]
    threshold_at_fpr: dict[str, float]
    ci: dict[str, tuple[float, float]]
    per_volume: dict[str, dict[str, float]]
    by_size: dict[str, dict[str, float]]
    p_healthy_before: float = float("nan")
    p_healthy_after: float = float("nan")


@dataclass(frozen=True)
class EvaluationReport:
    """All methods on one split, with how thresholds were chosen."""

    split: str
    subjects: tuple[str, ...]
    lesion_voxels: int
    voxels: int
    pathological_slices: int
    healthy_slices: int
    threshold_source: str
    median_filter: int
    bootstrap: int
    results: tuple[MethodResult, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


def _pooled(volumes: Sequence[VolumeScores], method: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([v.scores[method] for v in volumes]),
        np.concatenate([v.truth for v in volumes]),
    )


def best_threshold(volumes: Sequence[VolumeScores], method: str) -> float:
    """The threshold with the best pooled Dice on these volumes (NaN without lesion voxels)."""
    scores, truth = _pooled(volumes, method)
    return best_dice(scores, truth)[1] if truth.any() else float("nan")


def _dice_at(volumes: Sequence[VolumeScores], method: str, thresholds: Sequence[float]) -> float:
    """Pooled Dice with one threshold per volume (NaN if any threshold is NaN)."""
    tp = fp = fn = 0
    for v, threshold in zip(volumes, thresholds, strict=True):
        if not np.isfinite(threshold) and not np.isposinf(threshold):
            return float("nan")
        a, b, c = confusion_at(v.scores[method], v.truth, threshold)
        tp, fp, fn = tp + a, fp + b, fn + c
    return dice_counts(tp, fp, fn)


def _slice_table(v: VolumeScores, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slice ids, max score, mean score) of the slices of one volume, and labels via healthy_slices."""
    ids, maxima = slice_scores(v.scores[method], v.slice_ids, "max")
    _, means = slice_scores(v.scores[method], v.slice_ids, "mean")
    return ids, maxima, means


def _volume_metrics(v: VolumeScores, method: str, otsu_dice: dict[int, float]) -> dict[str, float]:
    """One volume's metrics; `otsu_dice` is its `per_slice_otsu_dice` for this method."""
    scores, truth = v.scores[method], v.truth
    ids, maxima, _ = _slice_table(v, method)
    labels = ~np.isin(ids, v.healthy_slices)
    return {
        "auroc": auroc(scores, truth),
        "auprc": auprc(scores, truth),
        "dice_best": best_dice(scores, truth)[0],
        "dice_slice_otsu": float(np.mean(list(otsu_dice.values()))) if otsu_dice else float("nan"),
        "slice_auroc_max": auroc(maxima, labels),
        "lesion_voxels": float(truth.sum()),
    }


def _size_metrics(
    volumes: Sequence[VolumeScores], method: str, slice_dice: Sequence[dict[int, float]]
) -> dict[str, dict[str, float]]:
    """Per lesion-size bin: pooled AUROC/AUPRC over the voxels of the bin's diseased slices, mean Otsu Dice.

    `slice_dice` holds each volume's `per_slice_otsu_dice` for this method.
    """
    grouped: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    for v, otsu_dice in zip(volumes, slice_dice, strict=True):
        for k, d in otsu_dice.items():
            in_slice = v.slice_ids == k
            area = float(v.truth[in_slice].sum()) * v.pixel_area_mm2
            grouped.setdefault(size_bin(area), []).append((v.scores[method][in_slice], v.truth[in_slice], d))
    result: dict[str, dict[str, float]] = {}
    for name in ("small", "medium", "large"):
        items = grouped.get(name, [])
        if not items:
            result[name] = {"slices": 0.0}
            continue
        scores = np.concatenate([s for s, _, _ in items])
        truth = np.concatenate([t for _, t, _ in items])
        result[name] = {
            "slices": float(len(items)),
            "auroc": auroc(scores, truth),
            "auprc": auprc(scores, truth),
            "dice_slice_otsu": float(np.mean([d for _, _, d in items])),
        }
    return result


def evaluate_method(
    volumes: Sequence[VolumeScores],
    method: Method,
    threshold_volumes: Sequence[VolumeScores] | None = None,
    fprs: Sequence[float] = (0.01, 0.05),
    bootstrap: int = 1000,
    seed: int = 0,
) -> MethodResult:
    """Every metric of one method on `volumes`.

    The 'chosen' threshold is the best-Dice threshold of `threshold_volumes` (a validation split),
    or, without them, of the other volumes of this split (leave one volume out). FPR thresholds
    come from the lesion-free slices of `threshold_volumes`, else of this split.
    """
    name = method.name
    scores, truth = _pooled(volumes, name)
    dice_best, threshold_best = best_dice(scores, truth)
    slice_dice = [per_slice_otsu_dice(v.scores[name], v.truth, v.slice_ids) for v in volumes]
    all_dice = [d for per in slice_dice for d in per.values()]
    if threshold_volumes:
        chosen = best_threshold(threshold_volumes, name)
        thresholds = [chosen] * len(volumes)
    elif len(volumes) > 1:
        thresholds = [best_threshold([w for j, w in enumerate(volumes) if j != i], name) for i in range(len(volumes))]
        chosen = float(np.median(thresholds))
    else:
        thresholds, chosen = [float("nan")], float("nan")
    reference = threshold_volumes or volumes
    healthy = np.concatenate([v.scores[name][v.healthy_voxels()] for v in reference])
    at_fpr, threshold_fpr = {}, {}
    for fpr in fprs:
        key = f"{fpr * 100:g}%"
        threshold_fpr[key] = threshold_at_fpr(healthy, fpr)
        at_fpr[key] = _dice_at(volumes, name, [threshold_fpr[key]] * len(volumes))
    slice_ids, maxima, means = [], [], []
    for v in volumes:
        ids, mx, mn = _slice_table(v, name)
        slice_ids.append(~np.isin(ids, v.healthy_slices))
        maxima.append(mx)
        means.append(mn)
    slice_labels = np.concatenate(slice_ids)
    ci = _bootstrap(volumes, name, slice_dice, bootstrap, seed)
    p_before = [v.p_healthy[name][0] for v in volumes if name in v.p_healthy]
    p_after = [v.p_healthy[name][1] for v in volumes if name in v.p_healthy]
    return MethodResult(
        method=name,
        description=method.describe(),
        regime=method.regime,
        auroc=auroc(scores, truth),
        auprc=auprc(scores, truth),
        dice_slice_otsu=float(np.mean(all_dice)) if all_dice else float("nan"),
        dice_chosen=_dice_at(volumes, name, thresholds),
        threshold_chosen=chosen,
        dice_best=dice_best,
        threshold_best=threshold_best,
        slice_auroc_max=auroc(np.concatenate(maxima), slice_labels),
        slice_auroc_mean=auroc(np.concatenate(means), slice_labels),
        dice_at_fpr=at_fpr,
        threshold_at_fpr=threshold_fpr,
        ci=ci,
        per_volume={v.subject: _volume_metrics(v, name, d) for v, d in zip(volumes, slice_dice, strict=True)},
        by_size=_size_metrics(volumes, name, slice_dice),
        p_healthy_before=float(np.mean(p_before)) if p_before else float("nan"),
        p_healthy_after=float(np.mean(p_after)) if p_after else float("nan"),
    )


def _bootstrap(
    volumes: Sequence[VolumeScores], name: str, slice_dice: list[dict[int, float]], n: int, seed: int
) -> dict[str, tuple[float, float]]:
    """Bootstrap over volumes: curve metrics from per-volume score histograms, Otsu Dice exactly."""
    scores = np.concatenate([v.scores[name] for v in volumes])
    edges = np.unique(np.quantile(scores, np.linspace(0, 1, HISTOGRAM_BINS + 1)))
    if len(edges) < 2:
        edges = np.array([scores.min(), scores.min() + 1.0])
    counts = [histogram_counts(v.scores[name], v.truth, edges) for v in volumes]

    def curve(metric: str) -> Callable[[np.ndarray], float]:
        def statistic(indices: np.ndarray) -> float:
            pos = np.sum([counts[i][0] for i in indices], axis=0)
            neg = np.sum([counts[i][1] for i in indices], axis=0)
            return counts_metrics(pos, neg)[metric]

        return statistic

    def otsu_dice(indices: np.ndarray) -> float:
        values = [d for i in indices for d in slice_dice[i].values()]
        return float(np.mean(values)) if values else float("nan")

    ci = {
        metric: bootstrap_interval(curve(metric), len(volumes), n, seed) for metric in ("auroc", "auprc", "dice_best")
    }
    ci["dice_slice_otsu"] = bootstrap_interval(otsu_dice, len(volumes), n, seed)
    return ci


def evaluate(
    volumes: Sequence[VolumeScores],
    methods: Sequence[Method],
    split: str,
    threshold_volumes: Sequence[VolumeScores] | None = None,
    fprs: Sequence[float] = (0.01, 0.05),
    bootstrap: int = 1000,
    median_size: int = 0,
    seed: int = 0,
    threshold_split: str | None = None,
) -> EvaluationReport:
    """Every method on the scored volumes of a split (see `evaluate_method`)."""
    if not volumes:
        raise InputError(f"no volumes with lesion masks in the {split} split")
    if threshold_volumes:
        source = f"best Dice on the {threshold_split or 'threshold'} split"
    elif len(volumes) > 1:
        source = "best Dice on the other volumes (leave one volume out)"
    else:
        source = "none (one volume and no threshold split)"
    results = tuple(evaluate_method(volumes, m, threshold_volumes, fprs, bootstrap, seed) for m in methods)
    pathological = sum(len(np.setdiff1d(np.unique(v.slice_ids), v.healthy_slices)) for v in volumes)
    return EvaluationReport(
        split=split,
        subjects=tuple(v.subject for v in volumes),
        lesion_voxels=int(sum(v.truth.sum() for v in volumes)),
        voxels=int(sum(v.truth.size for v in volumes)),
        pathological_slices=int(pathological),
        healthy_slices=int(sum(len(v.healthy_slices) for v in volumes)),
        threshold_source=source,
        median_filter=median_size,
        bootstrap=bootstrap,
        results=results,
    )


def _f(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _with_ci(value: float, interval: tuple[float, float]) -> str:
    if not all(np.isfinite(interval)):
        return _f(value)
    return f"{_f(value)} [{_f(interval[0])}, {_f(interval[1])}]"


def report_markdown(report: EvaluationReport) -> str:
    """The results as markdown tables: main metrics, FPR-calibrated Dice, per volume, by lesion size."""
    r0 = report.results[0]
    fpr_keys = list(r0.dice_at_fpr)
    lines = [
        f"## Evaluation on the {report.split} split",
        "",
        f"{len(report.subjects)} volume(s) ({', '.join(report.subjects)}); {report.voxels} scored brain voxels, "
        f"{report.lesion_voxels} lesion voxels; {report.pathological_slices} diseased and "
        f"{report.healthy_slices} lesion-free slices. Median filter: "
        f"{report.median_filter if report.median_filter > 1 else 'none'}. Chosen threshold: "
        f"{report.threshold_source}. Brackets: bootstrap 95% interval over volumes ({report.bootstrap} resamples).",
        "",
        "| regime | method | AUROC | AUPRC | Dice (slice Otsu) | Dice (chosen thr.) | Dice (best) | "
        + " | ".join(f"Dice @FPR {k}" for k in fpr_keys)
        + " | slice AUROC (max) | slice AUROC (mean) | p(healthy) before -> after |",
        "|---" * (10 + len(fpr_keys)) + "|",
    ]
    grouped = sorted(report.results, key=lambda r: REGIMES.index(r.regime) if r.regime in REGIMES else len(REGIMES))
    for r in grouped:
        p = "" if not np.isfinite(r.p_healthy_before) else f"{_f(r.p_healthy_before)} -> {_f(r.p_healthy_after)}"
        lines.append(
            f"| {r.regime} | {r.method} | {_with_ci(r.auroc, r.ci['auroc'])} | {_with_ci(r.auprc, r.ci['auprc'])} | "
            f"{_with_ci(r.dice_slice_otsu, r.ci['dice_slice_otsu'])} | {_f(r.dice_chosen)} | "
            f"{_with_ci(r.dice_best, r.ci['dice_best'])} | "
            + " | ".join(_f(r.dice_at_fpr[k]) for k in fpr_keys)
            + f" | {_f(r.slice_auroc_max)} | {_f(r.slice_auroc_mean)} | {p} |"
        )
    lines += ["", "Methods: " + "; ".join(f"**{r.method}**: {r.description}" for r in report.results)]
    lines += ["", "Regimes: " + "; ".join(f"**{name}**: {text}" for name, text in REGIME_TEXT.items()), ""]
    lines += [
        "### Per volume",
        "",
        "| method | subject | AUROC | AUPRC | Dice (slice Otsu) | Dice (best) | slice AUROC |",
    ]
    lines.append("|---" * 7 + "|")
    for r in report.results:
        for subject, m in r.per_volume.items():
            lines.append(
                f"| {r.method} | {subject} | {_f(m['auroc'])} | {_f(m['auprc'])} | {_f(m['dice_slice_otsu'])} | "
                f"{_f(m['dice_best'])} | {_f(m['slice_auroc_max'])} |"
            )
    lines += ["", "### By lesion size per slice (small < 1 cm², medium < 10 cm², large)", ""]
    lines += ["| method | size | slices | AUROC | AUPRC | Dice (slice Otsu) |", "|---" * 6 + "|"]
    for r in report.results:
        for size, m in r.by_size.items():
            lines.append(
                f"| {r.method} | {size} | {int(m['slices'])} | {_f(m.get('auroc', float('nan')))} | "
                f"{_f(m.get('auprc', float('nan')))} | {_f(m.get('dice_slice_otsu', float('nan')))} |"
            )
    return "\n".join(lines) + "\n"


def flat_metrics(report: EvaluationReport) -> dict[str, float]:
    """'{method}.{metric}' -> value, for MLflow metrics."""
    flat: dict[str, float] = {}
    for r in report.results:
        base = {
            "auroc": r.auroc,
            "auprc": r.auprc,
            "dice_slice_otsu": r.dice_slice_otsu,
            "dice_chosen": r.dice_chosen,
            "dice_best": r.dice_best,
            "slice_auroc_max": r.slice_auroc_max,
            "slice_auroc_mean": r.slice_auroc_mean,
            **{f"dice_fpr_{k.rstrip('%')}pct": v for k, v in r.dice_at_fpr.items()},
        }
        flat.update({f"{r.method}.{k}": float(v) for k, v in base.items()})
    return flat
