"""The extension points: a guidance target, a residual and an encoding registered from outside the package
reach config validation, `explain_settings`, the guided denoiser and evaluate's method keys unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from model_support import TINY, tiny_bundle

from anomaly_diffusion.config import load_config
from anomaly_diffusion.counterfactual.denoisers import denoiser, guided_denoiser
from anomaly_diffusion.counterfactual.settings import ExplainSettings, explain_settings
from anomaly_diffusion.counterfactual.slices import encode_slices
from anomaly_diffusion.diffusion.encoding import ENCODINGS
from anomaly_diffusion.diffusion.guidance import GUIDANCE, GuidanceSource, classifier_target
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.evaluation.grammar import parse_method
from anomaly_diffusion.evaluation.methods import bind_methods
from anomaly_diffusion.residuals import RESIDUALS, residual_map

DIRECTION = 0.25  # the toy target's constant gradient


def _toy_grad(source: GuidanceSource):  # type: ignore[no-untyped-def]
    """A target whose grad log p is DIRECTION everywhere (it ignores the classifier)."""
    return lambda x_t, t: torch.full_like(x_t, DIRECTION)


@pytest.fixture
def toy_target() -> Iterator[str]:
    GUIDANCE.register("toy", classifier_target(_toy_grad), "a constant push, for tests")
    GUIDANCE.register("toy-attn", classifier_target(_toy_grad, poolings=("attention",)), "needs attention pooling")
    try:
        yield "toy"
    finally:
        GUIDANCE.unregister("toy")
        GUIDANCE.unregister("toy-attn")


def test_a_registered_guidance_target_guides_with_its_gradient(toy_target: str) -> None:
    bundle = tiny_bundle()
    settings = explain_settings(bundle, guidance=toy_target, scale=3.0)
    assert settings.guidance == "toy"
    x_t, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 40])
    guided = guided_denoiser(bundle, settings.scale, False, settings.guidance)(x_t, t)
    alpha_bar = bundle.schedule.alpha_bar[t].reshape(-1, 1, 1, 1)
    # eps_hat = eps - s sqrt(1 - alpha_bar_t) grad, with grad = DIRECTION
    expected = denoiser(bundle, False)(x_t, t) - 3.0 * (1 - alpha_bar).sqrt() * DIRECTION
    assert torch.allclose(guided, expected, atol=1e-6)


def test_a_registered_target_is_a_config_value_and_a_method_key(toy_target: str) -> None:
    cfg = load_config(TINY, [f"explain.guidance={toy_target}"])
    assert cfg.explain.guidance == "toy"
    method = parse_method("push:g=toy,s=2", cfg)
    assert method.guidance == "toy" and "toy guidance" in method.describe()
    (bound,) = bind_methods([method], tiny_bundle())
    assert [p.guidance for p in bound.plans] == ["toy"]


def test_a_target_refuses_a_classifier_it_cannot_use(toy_target: str) -> None:
    with pytest.raises(ConfigError, match="guidance=toy-attn needs a classifier with pooling=attention"):
        explain_settings(tiny_bundle(), guidance="toy-attn")
    with pytest.raises(ConfigError, match=r"needs classifier\.pooling=attention"):
        load_config(TINY, ["explain.guidance=toy-attn"])


def test_unknown_names_list_the_registry() -> None:
    with pytest.raises(ConfigError, match="guidance must be one of slice, regions, cfg, got 'nope'"):
        explain_settings(tiny_bundle(), guidance="nope")
    with pytest.raises(ConfigError, match="g must be slice, regions or cfg"):
        parse_method("x:g=nope", load_config(TINY))
    with pytest.raises(ConfigError, match="encoding must be one of ddim, noise"):
        explain_settings(tiny_bundle(), encoding="sde")


def test_a_registered_residual_and_encoding_are_usable() -> None:
    RESIDUALS.register("squared", lambda d: d**2, "sum_c (x_c - x_healthy_c)^2")
    ENCODINGS.register("identity", lambda eps, x, schedule, grid, context: x.clone(), "x_L = x_0 (for tests)")
    try:
        x, x_healthy = torch.tensor([[[[3.0]], [[1.0]]]]), torch.tensor([[[[1.0]], [[2.0]]]])
        assert residual_map(x, x_healthy, "squared").item() == 5.0
        assert load_config(TINY, ["explain.residual=squared"]).explain.residual == "squared"
        bundle = tiny_bundle()
        settings = explain_settings(bundle, encoding="identity", residual="squared")
        assert isinstance(settings, ExplainSettings)
        slices = torch.randn(3, 1, 16, 16)
        assert torch.equal(encode_slices(bundle, slices, settings), slices)
        assert parse_method("sq:r=squared,enc=identity", bundle.config).encoding == "identity"
    finally:
        RESIDUALS.unregister("squared")
        ENCODINGS.unregister("identity")


def test_the_grid_is_made_once_and_checked_there() -> None:
    bundle = tiny_bundle()  # T = 100
    settings = explain_settings(bundle, noise_level=60, steps=6)
    assert settings.grid.taus == (10, 20, 30, 40, 50, 60) and settings.noise_level == 60
    assert explain_settings(bundle, noise_level=7, steps=None, steps_given=True).grid.steps == 7
    for level, steps, message in ((100, None, "noise level must be in 1..99"), (10, 11, "steps must be in 1..10")):
        with pytest.raises(ConfigError, match=message):
            explain_settings(bundle, noise_level=level, steps=steps, steps_given=True)
    with pytest.raises(ConfigError, match="scale must be in"):
        explain_settings(bundle, scale=-1.0)
