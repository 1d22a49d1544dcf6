"""Classifier-free guidance (Ho & Salimans 2022): the combination, its batching, label dropout, the
label-conditional UNet and how a classifier-free model is configured and refused."""

from __future__ import annotations

import pytest
import torch
from model_support import TINY, tiny_bundle, tiny_cfg_bundle

from anomaly_diffusion.config import CFG_DEFAULT_SCALE, load_config
from anomaly_diffusion.counterfactual.denoisers import denoiser, guided_denoiser
from anomaly_diffusion.counterfactual.scan import explain_slices
from anomaly_diffusion.counterfactual.settings import explain_settings
from anomaly_diffusion.counterfactual.slices import decode_slices, encode_slices
from anomaly_diffusion.diffusion.guidance import GUIDANCE, cfg_eps, cfg_eps_fn, check_guidance
from anomaly_diffusion.diffusion.sampling import ddim_decode, ddim_encode
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.labels import HEALTHY, NULL_LABEL, PATHOLOGICAL
from anomaly_diffusion.runtime import autocast
from anomaly_diffusion.training.loops import drop_labels

# an oracle label-conditional denoiser: eps(x, t, y) = A[y] * x + t / 100, exact in closed form
A = torch.tensor([0.5, -1.0, 2.0])  # HEALTHY, PATHOLOGICAL, NULL_LABEL


class Oracle:
    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.batches.append(x_t.shape[0])
        return A[y].reshape(-1, 1, 1, 1) * x_t + t.reshape(-1, 1, 1, 1).float() / 100


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, 7.5])
def test_the_wrapper_returns_the_closed_form_combination(w: float) -> None:
    oracle = Oracle()
    x_t, t = torch.randn(3, 1, 4, 4), torch.tensor([1, 50, 99])
    eps_hat = cfg_eps_fn(oracle, w)(x_t, t)
    # eps_null + w (eps_healthy - eps_null) = (A_null + w (A_healthy - A_null)) x + t/100
    expected = (A[NULL_LABEL] + w * (A[HEALTHY] - A[NULL_LABEL])) * x_t + t.reshape(-1, 1, 1, 1) / 100
    assert torch.allclose(eps_hat, expected, atol=1e-6)
    # w = 0 and w = 1 run one pass of B slices; other weights one batched pass of 2B (cond + null)
    assert oracle.batches == ([3] if w in (0.0, 1.0) else [6])


def test_weight_zero_is_the_unconditional_path_and_one_the_conditional() -> None:
    oracle = Oracle()
    x_t, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 7])
    null = oracle(x_t, t, torch.full((2,), NULL_LABEL))
    healthy = oracle(x_t, t, torch.full((2,), HEALTHY))
    assert torch.equal(cfg_eps_fn(oracle, 0.0)(x_t, t), null)
    assert torch.equal(cfg_eps_fn(oracle, 1.0)(x_t, t), healthy)
    assert torch.allclose(cfg_eps(healthy, null, 2.0), 2 * healthy - null)
    pathological = cfg_eps_fn(oracle, 2.0, target=PATHOLOGICAL)(x_t, t)
    assert torch.allclose(pathological, 2 * oracle(x_t, t, torch.full((2,), PATHOLOGICAL)) - null, atol=1e-6)


def test_label_dropout_drops_the_configured_fraction_seeded() -> None:
    y = torch.randint(0, 2, (200_000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(y, 0.15, torch.Generator().manual_seed(1))
    is_null = dropped == NULL_LABEL
    assert abs(float(is_null.float().mean()) - 0.15) < 0.005
    assert torch.equal(dropped[~is_null], y[~is_null])  # the others keep their label
    assert torch.equal(dropped, drop_labels(y, 0.15, torch.Generator().manual_seed(1)))
    assert torch.equal(drop_labels(y, 0.0, torch.Generator().manual_seed(1)), y)
    assert (drop_labels(y[:100], 1.0 - 1e-12, torch.Generator()) == NULL_LABEL).all()


def test_the_conditional_unet_reads_its_label_and_defaults_to_null() -> None:
    unet = tiny_cfg_bundle().unet
    x_t, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 60])
    by_label = {y: unet(x_t, t, torch.full((2,), y)) for y in (HEALTHY, PATHOLOGICAL, NULL_LABEL)}
    assert torch.equal(unet(x_t, t), by_label[NULL_LABEL])
    assert not torch.allclose(by_label[HEALTHY], by_label[PATHOLOGICAL])


def test_the_cfg_target_guides_a_classifier_free_bundle_in_closed_form() -> None:
    bundle = tiny_cfg_bundle()
    settings = explain_settings(bundle, scale=4.0)
    assert settings.guidance == "cfg" and settings.scale == 4.0
    x_t, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 40])
    eps = {y: bundle.unet(x_t, t, torch.full((2,), y)) for y in (HEALTHY, NULL_LABEL)}
    guided = guided_denoiser(bundle, 4.0, False, "cfg")(x_t, t)
    assert torch.allclose(guided, eps[NULL_LABEL] + 4.0 * (eps[HEALTHY] - eps[NULL_LABEL]), atol=1e-5)
    assert not GUIDANCE.get("cfg").function.needs_gradients
    # w = 0 decodes exactly as unguided DDIM with the null label: the unconditional reconstruction
    x = torch.randn(3, 1, 16, 16)
    zero = explain_settings(bundle, scale=0.0, noise_level=20, steps=4)
    x_l = encode_slices(bundle, x, zero)
    eps_null = denoiser(bundle, zero.amp)
    assert torch.allclose(x_l, ddim_encode(eps_null, x, bundle.schedule, zero.grid), atol=1e-6)
    assert torch.allclose(decode_slices(bundle, x_l, zero), ddim_decode(eps_null, x_l, bundle.schedule, zero.grid))
    explained = explain_slices(bundle, x, explain_settings(bundle, noise_level=20, steps=4))
    assert explained.anomaly_map.shape == (3, 16, 16) and torch.isnan(explained.p_healthy_before).all()


def test_the_inversion_label_is_a_setting() -> None:
    bundle = tiny_cfg_bundle(overrides=["explain.encode_label=pathological"])
    settings = explain_settings(bundle, noise_level=20, steps=4)
    assert settings.encode_label == "pathological"
    x = torch.randn(2, 1, 16, 16)

    def eps_pathological(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(torch.device("cpu"), settings.amp):
            return bundle.unet(x_t, t, torch.full((x_t.shape[0],), PATHOLOGICAL)).float()

    expected = ddim_encode(eps_pathological, x, bundle.schedule, settings.grid)
    assert torch.allclose(encode_slices(bundle, x, settings), expected, atol=1e-6)
    assert settings.encode_key != explain_settings(tiny_cfg_bundle(), noise_level=20, steps=4).encode_key


def test_a_classifier_free_config_gets_its_defaults_and_refuses_what_does_not_apply() -> None:
    cfg = load_config(None, ["method=classifier_free"])
    assert (cfg.explain.guidance, cfg.explain.scale, cfg.data.ddpm_train_on) == ("cfg", CFG_DEFAULT_SCALE, "all")
    assert cfg.cfg.label_dropout == 0.15
    assert load_config(TINY, ["method=classifier_free"]).explain.scale == 10.0  # a config's own scale stays
    assert load_config(TINY, ["method=classifier_free", "cfg.label_dropout=0.2"]).cfg.label_dropout == 0.2
    with pytest.raises(ConfigError, match="guidance=slice needs a classifier; this model is classifier-free"):
        load_config(TINY, ["method=classifier_free", "explain.guidance=slice"])
    with pytest.raises(ConfigError, match=r"data\.ddpm_train_on=all"):
        load_config(TINY, ["method=classifier_free", "data.ddpm_train_on=healthy"])
    with pytest.raises(ConfigError, match="guidance=cfg needs a classifier-free model"):
        load_config(TINY, ["explain.guidance=cfg"])
    with pytest.raises(ConfigError, match="encode_label applies to classifier-free models only"):
        load_config(TINY, ["explain.encode_label=pathological"])
    with pytest.raises(ConfigError, match="label_dropout"):
        load_config(TINY, ["method=classifier_free", "cfg.label_dropout=1.5"])


def test_explain_refuses_guidance_the_model_cannot_give() -> None:
    with pytest.raises(ConfigError, match="guidance=regions needs a classifier; this model is classifier-free"):
        explain_settings(tiny_cfg_bundle(), guidance="regions")
    with pytest.raises(ConfigError, match="guidance=cfg needs a classifier-free model"):
        explain_settings(tiny_bundle(), guidance="cfg")
    assert check_guidance("cfg", "mean", "classifier_free") == "cfg"
