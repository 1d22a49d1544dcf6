"""One typed config tree (pydantic), loaded from YAML with dotted command-line overrides.

    cfg = load_config(Path("configs/default.yaml"), ["train.ddpm_steps=200", "data.image_size=32"])

The resolved config (`cfg.model_dump(mode="json")`) is saved in the model bundle and logged to
MLflow, so explain applies exactly the preprocessing and models that training used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from anomaly_diffusion.diffusion.decoding import DECODINGS
from anomaly_diffusion.diffusion.guidance import GUIDANCE, GuidanceMethod, guidance_conflict
from anomaly_diffusion.diffusion.sampling import ddim_grid
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.registry import Registry
from anomaly_diffusion.residuals import RESIDUALS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleConfig(_Strict):
    """The DDPM noise schedule (T = num_timesteps)."""

    kind: Literal["linear", "cosine"] = "linear"
    num_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)


class UNetConfig(_Strict):
    """MONAI `DiffusionModelUNet` hyper-parameters (the DDPM's eps_theta)."""

    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = Field(1, ge=1)
    num_head_channels: int = Field(32, ge=1)
    norm_num_groups: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        _check_levels(self.channels, self.attention_levels, self.norm_num_groups, self.num_head_channels)
        return self


class ClassifierConfig(_Strict):
    """The noise-aware classifier p(y | x_t, t): MONAI's `DiffusionModelEncoder` trunk + pooling head."""

    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = Field(1, ge=1)
    num_head_channels: int = Field(32, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    pooling: Literal["mean", "attention", "lse"] = "mean"

    @model_validator(mode="after")
    def _check(self) -> ClassifierConfig:
        _check_levels(self.channels, self.attention_levels, self.norm_num_groups, self.num_head_channels)
        return self


def _check_levels(channels: tuple[int, ...], attention: tuple[bool, ...], groups: int, head_channels: int) -> None:
    if len(channels) != len(attention):
        raise ValueError("channels and attention_levels need the same length")
    if any(c % groups for c in channels):
        raise ValueError(f"every channel count must be divisible by norm_num_groups={groups}")
    if any(a and c % head_channels for c, a in zip(channels, attention, strict=True)):
        raise ValueError("attention levels need channels divisible by num_head_channels")


class DataConfig(_Strict):
    """Where training data comes from and the preprocessing that training and explain share."""

    manifest: Path | None = None
    image_channels: int = Field(1, ge=1)
    image_size: int = Field(64, ge=8)
    slice_axis: Literal["axial", "coronal", "sagittal"] = "axial"
    intensity_percentiles: tuple[float, float] = (1.0, 99.0)
    clip_range: tuple[float, float] = (-1.0, 3.0)
    crop_margin: float = Field(0.05, ge=0, le=1)
    min_foreground_fraction: float = Field(0.05, ge=0, le=1)
    min_lesion_pixels: int = Field(1, ge=1)
    ddpm_train_on: Literal["healthy", "all"] = "healthy"

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        low, high = self.intensity_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError("intensity_percentiles must satisfy 0 <= low < high <= 100")
        if self.clip_range[0] >= self.clip_range[1]:
            raise ValueError("clip_range must be (low, high) with low < high")
        return self


class TrainConfig(_Strict):
    """Optimisation of both models. Steps are optimiser steps; batches are sampled with replacement."""

    ddpm_steps: int = Field(2000, ge=0)
    classifier_steps: int = Field(1000, ge=0)
    batch_size: int = Field(16, ge=1)
    ddpm_lr: float = Field(2e-4, gt=0)
    classifier_lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    classifier_flip: bool = True
    classifier_jitter: float = Field(0.0, ge=0, lt=1)  # random zoom 1 +- j and shift <= j/2 (data/augment.py)
    classifier_max_timestep: int | None = Field(None, ge=0)  # None: t ~ U{0..T-1} as in the paper
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(25, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    compile: bool = False  # torch.compile both networks (minutes to compile; pays off on long GPU runs)
    output_dir: Path = Path("adiff_runs")


class HarmoniseConfig(_Strict):
    """THOR's harmonised decoding (`explain.decoding: thor`; see `diffusion.harmonise.Harmonisation`)."""

    levels: int = Field(4, ge=0)  # decode levels harmonised, spread over tau_1..tau_{K-1}
    threshold: float = Field(0.5, ge=0)  # sum_c |x0_hat - x| above it is anomalous (normalised units)
    dilation: int = Field(1, ge=0)  # the map is max-pooled over (2d + 1)^2 pixels first
    soft: bool = False  # blend with clip(map / threshold, 0, 1) instead of the hard threshold


class MaskConfig(_Strict):
    """The soft lesion mask of masked decoding (`explain.decoding: masked`; see `diffusion.masking.region_mask`)."""

    threshold: float = Field(0.5, ge=0, lt=1)  # a region is masked where its upsampled p(abnormal) exceeds it
    dilation: int = Field(2, ge=0)  # the hard mask grows by this many pixels
    sigma: float = Field(2.0, ge=0)  # then is blurred with a Gaussian of this std (pixels)


class ExplainConfig(_Strict):
    """Defaults of `adiff explain` (each has a command-line option or an --set key)."""

    noise_level: int = Field(500, ge=1)
    scale: float = Field(100.0, ge=0)
    steps: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=0)  # 0: as many slices as fit in free GPU memory (32 on CPU)
    compile: bool = False  # torch.compile both networks for explain (pays off for many volumes)
    montage_slices: int = Field(4, ge=1)
    threshold: float | None = None  # anomaly volume threshold; None = Otsu over the scan's foreground scores
    # which differences make the map, a `residuals.RESIDUALS` name: 'abs' |x - x_healthy| (Wolleb 2022),
    # 'positive' only where the scan is brighter than its counterfactual (FLAIR, T2), 'negative' darker
    residual: str = "abs"
    # guidance target, a `diffusion.guidance.GUIDANCE` name: 'slice' log p(healthy | x_t) (Wolleb 2022);
    # 'regions' sum_p log p(region p healthy | x_t), every region of the (lse) classifier towards healthy
    guidance: str = "slice"
    # classifier-free models only: the label of the DDIM inversion, 'null' (unconditional) or 'pathological'
    encode_label: Literal["null", "pathological"] = "null"
    # how x_L is decoded, a `diffusion.decoding.DECODINGS` name: 'ddim' (Wolleb 2022) or 'thor' (Bercea 2024)
    decoding: str = "ddim"
    harmonise: HarmoniseConfig = HarmoniseConfig()
    # cell size in pixels of the coarse/simplex encodings' noise; None: S/16 (coarse), S/4 (simplex)
    noise_cell: int | None = Field(None, ge=1)
    # what the counterfactual is compared with for the map: 'input' (x, Wolleb 2022) or 'reconstruction'
    # (the plain DDIM decoding of the same x_L: the reconstruction error both share cancels)
    pairing: Literal["input", "reconstruction"] = "input"
    residual_channel: int | None = Field(None, ge=0)  # the map from this channel only; None: summed over channels
    smooth: float = Field(0.0, ge=0)  # std (pixels) of the Gaussian low-passing the classifier gradient (no lattice)
    mask: MaskConfig = MaskConfig()
    # slices with p(pathological | x, t=0) below it are not decoded (map 0): pays for a second decoding
    gate: float = Field(0.0, ge=0, lt=1)

    @field_validator("encode_label", mode="before")
    @classmethod
    def _null_label(cls, value: Any) -> Any:
        return "null" if value is None else value  # YAML reads an unquoted `null` as None

    @field_validator("residual", "guidance", "decoding")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        registries: dict[str, Registry[Any]] = {"residual": RESIDUALS, "guidance": GUIDANCE, "decoding": DECODINGS}
        registry = registries[str(info.field_name)]
        if value not in registry:
            raise ValueError(f"must be one of {', '.join(registry.names())}")
        return value


class CfgConfig(_Strict):
    """Classifier-free guidance (`method: classifier_free`, Ho & Salimans 2022): the conditional DDPM's training."""

    # each training slice's label is replaced by the null label with this probability, so one UNet
    # learns eps(x_t, t, y) and eps(x_t, t, null)
    label_dropout: float = Field(0.15, ge=0, lt=1)


CFG_DEFAULT_SCALE = 3.0
"""explain.scale (the weight w) of a classifier-free model whose config does not set one."""


class TrackingConfig(_Strict):
    """MLflow: None means `MLFLOW_TRACKING_URI` if set, else a local SQLite file."""

    uri: str | None = None
    experiment: str = "anomaly_diffusion"


class Config(_Strict):
    """The whole configuration of a run.

    `method` decides what `adiff train` trains and the bundle holds: `classifier` (the paper) an
    unconditional DDPM and a noise-aware classifier; `classifier_free` one label-conditional DDPM
    (null label with probability `cfg.label_dropout`), no classifier. A classifier-free config that
    does not set them gets `explain.guidance: cfg`, `explain.scale: CFG_DEFAULT_SCALE` (w) and
    `data.ddpm_train_on: all` (the conditional DDPM must see both labels).
    """

    method: GuidanceMethod = "classifier"
    schedule: ScheduleConfig = ScheduleConfig()
    unet: UNetConfig = UNetConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    explain: ExplainConfig = ExplainConfig()
    tracking: TrackingConfig = TrackingConfig()
    cfg: CfgConfig = CfgConfig()

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("method") != "classifier_free":
            return data
        explain = dict(data.get("explain") or {})
        explain.setdefault("guidance", "cfg")
        explain.setdefault("scale", CFG_DEFAULT_SCALE)
        section = dict(data.get("data") or {})
        section.setdefault("ddpm_train_on", "all")
        return {**data, "explain": explain, "data": section}

    @model_validator(mode="after")
    def _check(self) -> Config:
        for name, levels in (("unet", len(self.unet.channels) - 1), ("classifier", len(self.classifier.channels))):
            factor = 2**levels
            if self.data.image_size % factor:
                raise ValueError(
                    f"data.image_size={self.data.image_size} must be divisible by {factor} "
                    f"({name} downsamples {levels} times)"
                )
        try:  # the one check of L and K (the same function explain and evaluate build their grid with)
            ddim_grid(self.explain.noise_level, self.explain.steps, self.schedule.num_timesteps)
        except ConfigError as exc:
            raise ValueError(f"explain: {exc}") from None
        target = GUIDANCE.get(self.explain.guidance).function
        if self.method == "classifier" and target.poolings and self.classifier.pooling not in target.poolings:
            raise ValueError(
                f"explain.guidance={self.explain.guidance} needs classifier.pooling={' or '.join(target.poolings)}"
            )
        conflict = guidance_conflict(self.explain.guidance, self.classifier.pooling, self.method)
        if conflict:
            raise ValueError(f"explain.{conflict} (method={self.method})")
        if self.method == "classifier_free" and self.data.ddpm_train_on != "all":
            raise ValueError(
                "method=classifier_free trains the DDPM on every slice with its label: data.ddpm_train_on=all"
            )
        if self.method == "classifier" and self.explain.encode_label != "null":
            raise ValueError("explain.encode_label applies to classifier-free models only (method=classifier_free)")
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse 'section.key=value' strings; values are YAML (numbers, lists, null, strings)."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML") from exc
        parsed.append((key.strip(), value))
    return parsed


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> Config:
    """Validate a config tree after applying dotted overrides."""
    tree = dict(data)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise ConfigError(f"{source}: {where}: {first['msg']}") from exc


def override_explain(cfg: Config, overrides: list[str]) -> Config:
    """A trained model's config with `explain.*` overrides (its networks, data and schedule are fixed)."""
    for key, _ in parse_overrides(overrides):
        if not key.startswith("explain."):
            raise ConfigError(f"override {key!r}: only explain.* settings can change for a trained model")
    return config_from_dict(cfg.model_dump(mode="json"), overrides, source="--set")


def load_config(path: Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (defaults when path is None) and apply dotted overrides.

    Relative `data.manifest` paths are resolved against the YAML file's folder.
    """
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded or {}
        manifest = (data.get("data") or {}).get("manifest")
        if manifest and not Path(manifest).is_absolute():
            data = {**data, "data": {**data["data"], "manifest": str(path.parent / manifest)}}
    return config_from_dict(data, overrides, source=str(path) if path else "config")
