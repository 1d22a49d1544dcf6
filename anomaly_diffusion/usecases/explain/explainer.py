"""What to explain and with which model: the options of `adiff explain` (and of every study of a
cohort), checked once, and the model loaded once per process with its checked settings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from anomaly_diffusion.config import override_explain
from anomaly_diffusion.counterfactual.settings import ExplainSettings, explain_settings
from anomaly_diffusion.diffusion.encoding import ENCODINGS, is_stochastic
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.runtime import compute_summary, model_device, precision_name, prepare_for_inference
from anomaly_diffusion.usecases.common import load_model
from anomaly_diffusion.usecases.explain.review import REVIEW_SLICES


@dataclass(frozen=True, kw_only=True)
class ExplainOptions:
    """The model and method options of one explanation, or of every study of a cohort; None takes the
    model's `explain` default. Checked once here (the settings themselves by `explain_settings`).

    Attributes:
        model: a bundle file, `models:/NAME/VERSION` or `models:/NAME@ALIAS`; None: the newest bundle.
        noise_level, scale, steps, guidance, residual, batch_size: `explain_settings` overrides.
        threshold: anomaly-volume threshold (None: the model's, else Otsu on this scan).
        compile_networks, fp32: `runtime.prepare_for_inference` options.
        encoding: an `ENCODINGS` name (None: 'ddim'); decoding: a `DECODINGS` name (None: the model's).
        ensemble_levels: noise levels whose maps are averaged (replaces noise_level), as evaluate's L=100+200.
        draws: draws of a stochastic encoding averaged per level (seeds 0..draws-1), as evaluate's n=.
            An ensemble of more than one member also writes its per-voxel spread (`_uncertainty.nii.gz`).
        review_slices: at most this many explained slices are logged as per-slice review images
            (every k-th when there are more), 0 none.
        explain_overrides: `explain.KEY=VALUE` replacing the model's explain defaults before the
            options above (e.g. explain.pairing=reconstruction, explain.gate=0.5, explain.mask.threshold=0.3).
    """

    out_dir: Path
    tracking_uri: str
    model: Path | str | None = None
    noise_level: int | None = None
    scale: float | None = None
    steps: int | None = None
    guidance: str | None = None
    residual: str | None = None
    batch_size: int | None = None
    threshold: float | None = None
    overwrite: bool = False
    device: str = "auto"
    compile_networks: bool = False
    fp32: bool = False
    encoding: str | None = None
    decoding: str | None = None
    ensemble_levels: Sequence[int] = ()
    draws: int = 1
    review_slices: int = REVIEW_SLICES
    explain_overrides: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.ensemble_levels and self.noise_level is not None:
            raise ConfigError("--ensemble gives the noise levels: leave out --noise-level")
        if self.draws < 1:
            raise ConfigError(f"--draws must be >= 1, got {self.draws}")
        encoding = self.encoding or "ddim"
        if self.draws > 1 and encoding in ENCODINGS and not is_stochastic(encoding):
            stochastic = ", ".join(n for n in ENCODINGS.names() if is_stochastic(n))
            raise ConfigError(
                f"--draws > 1 needs a stochastic --encoding ({stochastic}); {encoding!r} is deterministic"
            )

    @property
    def members(self) -> int:
        """How many maps the explanation averages."""
        return max(len(self.ensemble_levels), 1) * self.draws


@dataclass(frozen=True, kw_only=True)
class ExplainRequest(ExplainOptions):
    """One scan to explain, with `ExplainOptions`.

    Attributes:
        scans: one NIfTI file or DICOM series folder per model channel.
        mask: a ground-truth lesion mask (adds Dice/AUPRC against it); brainmask: the foreground.
    """

    scans: Sequence[Path]
    mask: Path | None = None
    brainmask: Path | None = None


def parse_levels(text: str) -> tuple[int, ...]:
    """'100+200' (or 'L=100+200', evaluate's key) -> (100, 200); one-line error otherwise."""
    body = text.strip().removeprefix("L=")
    try:
        levels = tuple(int(part) for part in body.split("+"))
    except ValueError as exc:
        raise ConfigError(f"--ensemble must be noise levels joined by '+', e.g. 100+200, got {text!r}") from exc
    return levels


@dataclass(frozen=True)
class Explainer:
    """A model loaded (once per process) with the settings it explains every scan with.

    Attributes:
        bundle: the networks, prepared for inference.
        plans: the settings of each ensemble member (one for a plain explanation): L, s, K, guidance,
            residual, encoding and its draw, decoding, batch size, precision.
        bundle_name: the bundle's file name; model_ref: 'NAME/VERSION' of a registered model.
        identity: what names this model across runs (registered version, training run, or file).
        threshold: the anomaly-volume threshold (the request's, else the model's); None: Otsu per scan.
    """

    bundle: ModelBundle
    plans: tuple[ExplainSettings, ...]
    bundle_name: str
    model_ref: str | None
    identity: str
    threshold: float | None

    @property
    def settings(self) -> ExplainSettings:
        """The first member's settings (what the others share but L and the draw)."""
        return self.plans[0]

    @property
    def precision(self) -> str:
        return precision_name(model_device(self.bundle), self.settings.amp)

    @property
    def compute(self) -> str:
        """The device, threads and precision, for the line printed before the work starts."""
        return f"compute: {compute_summary(model_device(self.bundle), self.settings.amp)}"

    def tags(self) -> dict[str, str]:
        """MLflow tags linking a run to the model's training run and registered version."""
        tags = {"adiff.train_run_id": self.bundle.train_run_id} if self.bundle.train_run_id else {}
        if self.model_ref:
            tags["adiff.model"] = self.model_ref
        return tags


def load_explainer(options: ExplainOptions, announce: Callable[[str], None] | None = None) -> Explainer:
    """Load the model of `options` (None: the newest bundle, said to `announce`) and check its explain settings once."""
    o = options
    bundle, bundle_name, model_ref = load_model(o.model, o.tracking_uri, o.device, announce)
    if o.explain_overrides:
        bundle = replace(bundle, config=override_explain(bundle.config, list(o.explain_overrides)))
    bundle = prepare_for_inference(bundle, o.compile_networks or bundle.config.explain.compile, o.fp32)
    plans = tuple(
        explain_settings(
            bundle,
            noise_level=level,
            steps=o.steps,
            scale=o.scale,
            guidance=o.guidance,
            residual=o.residual,
            batch_size=o.batch_size,
            encoding=o.encoding or "ddim",
            seed=draw,
            decoding=o.decoding,
        )
        for level in (list(o.ensemble_levels) if o.ensemble_levels else [o.noise_level])
        for draw in range(o.draws)
    )
    identity = model_ref or bundle.train_run_id or (str(Path(o.model).resolve()) if o.model else bundle_name)
    threshold = o.threshold if o.threshold is not None else bundle.config.explain.threshold
    return Explainer(bundle, plans, bundle_name, model_ref, identity, threshold)
