"""The named encodings, decodings and ensembles of explain, and their method keys, on the tiny model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from model_support import TINY, tiny_bundle

from anomaly_diffusion.config import load_config
from anomaly_diffusion.counterfactual.cache import SliceDecodings
from anomaly_diffusion.counterfactual.scan import explain_ensemble, explain_slices
from anomaly_diffusion.counterfactual.settings import explain_settings
from anomaly_diffusion.counterfactual.slices import (
    counterfactuals,
    decode_slices,
    encode_slices,
    guidance_mask,
    p_healthy_batched,
)
from anomaly_diffusion.diffusion.encoding import is_stochastic
from anomaly_diffusion.diffusion.harmonise import Harmonisation
from anomaly_diffusion.diffusion.masking import MaskSettings
from anomaly_diffusion.diffusion.schedule import q_sample
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.evaluation.grammar import parse_method
from anomaly_diffusion.evaluation.methods import bind_methods
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.models.networks import build_classifier
from anomaly_diffusion.residuals import residual_map


def _slices(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("encoding", ["noise", "coarse", "simplex"])
def test_stochastic_encodings_are_forward_noising_with_their_seeded_noise(encoding: str) -> None:
    bundle = tiny_bundle()
    x = _slices()
    settings = explain_settings(bundle, encoding=encoding, seed=3, noise_level=20)
    x_L = encode_slices(bundle, x, settings)
    assert torch.equal(x_L, encode_slices(bundle, x, settings))  # the seed fixes the draw
    other = encode_slices(bundle, x, explain_settings(bundle, encoding=encoding, seed=4, noise_level=20))
    assert not torch.equal(x_L, other)
    # x_L = sqrt(ab_L) x + sqrt(1 - ab_L) eps: the noise read back has unit variance
    a = bundle.schedule.alpha_bar[20]
    eps = (x_L - a.sqrt() * x) / (1 - a).sqrt()
    assert 0.6 < float(eps.var()) < 1.4 and is_stochastic(encoding)
    assert torch.allclose(q_sample(bundle.schedule, x, torch.full((3,), 20), eps), x_L, atol=1e-5)
    assert not is_stochastic("ddim")


def test_noise_cell_defaults_follow_the_papers_and_can_be_set() -> None:
    bundle = tiny_bundle()  # 16x16 slices
    assert explain_settings(bundle, encoding="coarse").noise_cell == 1  # S / 16
    assert explain_settings(bundle, encoding="simplex").noise_cell == 4  # S / 4
    assert explain_settings(bundle, encoding="coarse", noise_cell=8).noise_cell == 8
    coarse = [explain_settings(bundle, encoding="coarse", noise_cell=c) for c in (2, 8)]
    assert coarse[0].encode_key != coarse[1].encode_key
    # the cell and the seed do not split a deterministic encoding
    ddim = [explain_settings(bundle, noise_cell=c, seed=c) for c in (2, 8)]
    assert ddim[0].encode_key == ddim[1].encode_key


def test_thor_decoding_is_ddim_without_levels_and_differs_with_them() -> None:
    bundle = tiny_bundle()
    x = _slices(1)
    plain = explain_settings(bundle, scale=0.0)
    x_L = encode_slices(bundle, x, plain)
    expected = decode_slices(bundle, x_L, plain)
    off = explain_settings(bundle, scale=0.0, decoding="thor", harmonisation=Harmonisation(levels=0))
    assert torch.equal(decode_slices(bundle, x_L, off, x_0=x), expected)
    on = explain_settings(bundle, scale=0.0, decoding="thor", harmonisation=Harmonisation(levels=4, threshold=0.1))
    assert on.decode_key != plain.decode_key
    harmonised = decode_slices(bundle, x_L, on, x_0=x)
    assert not torch.allclose(harmonised, expected)
    with pytest.raises(ValueError, match="needs the encoded slices"):
        decode_slices(bundle, x_L, on)
    with pytest.raises(ConfigError, match="decoding must be one of ddim, thor"):
        explain_settings(bundle, decoding="nope")


def test_the_config_chooses_the_decoding() -> None:
    cfg = load_config(TINY, ["explain.decoding=thor", "explain.harmonise.threshold=0.2", "explain.harmonise.levels=2"])
    assert cfg.explain.decoding == "thor" and cfg.explain.harmonise.threshold == 0.2
    bundle = tiny_bundle()
    bundle.config = cfg
    settings = explain_settings(bundle)
    assert settings.decoding == "thor" and settings.harmonisation == Harmonisation(2, 0.2, 1, False)
    with pytest.raises(ConfigError, match=r"explain\.decoding: .*must be one of ddim, thor"):
        load_config(TINY, ["explain.decoding=nope"])


def test_an_ensemble_averages_its_members_and_its_spread_is_their_std() -> None:
    bundle = tiny_bundle()
    x = _slices(2)
    members = [explain_settings(bundle, encoding="noise", seed=s, scale=0.0) for s in (0, 1, 2)]
    ensemble = explain_ensemble(bundle, x, members)
    maps = torch.stack([explain_slices(bundle, x, m).anomaly_map for m in members])
    assert ensemble.members == 3
    assert torch.allclose(ensemble.mean.anomaly_map, maps.mean(dim=0), atol=1e-6)
    assert torch.allclose(ensemble.spread, maps.std(dim=0, correction=0), atol=1e-6)
    assert (ensemble.spread >= 0).all() and ensemble.spread.max() > 0
    same = explain_ensemble(bundle, x, [members[0], members[0]])  # identical members agree everywhere
    assert torch.equal(same.spread, torch.zeros_like(same.spread))
    done: list[tuple[int, int]] = []
    explain_ensemble(bundle, x, members[:2], lambda d, t: done.append((d, t)))
    assert done[-1] == (6, 6)  # two decodings of three slices


def test_method_keys_for_encodings_decodings_and_thor() -> None:
    cfg = load_config(TINY)
    coarse = parse_method("lowfreq:enc=coarse,f=4,n=3,L=20", cfg)
    assert (coarse.encoding, coarse.noise_cell, coarse.seeds) == ("coarse", 4, 3)
    assert "coarse noise (cell 4 px), mean of 3 draw(s)" in coarse.describe()
    thor = parse_method("thor:dec=thor,hl=2,ht=0.3,hd=0,L=20,K=5", cfg)
    assert thor.decoding == "thor" and thor.harmonisation == Harmonisation(2, 0.3, 0, False)
    assert "THOR-harmonised at 2 level(s), threshold 0.3, dilation 0" in thor.describe()
    bundle = tiny_bundle()
    bound = bind_methods([coarse, thor, parse_method("simplex:enc=simplex,n=2", cfg)], bundle)
    assert [p.seed for p in bound[0].plans] == [0, 1, 2] and {p.noise_cell for p in bound[0].plans} == {4}
    assert bound[1].plans[0].decoding == "thor" and bound[1].plans[0].harmonisation.levels == 2
    assert bound[2].plans[0].noise_cell == 4  # the simplex default, S / 4
    for spec, message in (
        ("x:ht=0.3", "add dec=thor"),
        ("x:dec=thor,ht=-1", "threshold >= 0"),
        ("x:dec=nope", "dec must be ddim, thor or masked"),
        ("x:enc=coarse,f=0", "noise cell"),
        ("x:n=2", "only with enc=noise/coarse/simplex"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_method(spec, cfg)


def _lse_bundle() -> ModelBundle:
    bundle = tiny_bundle()
    bundle.config = load_config(TINY, ["classifier.pooling=lse"])
    torch.manual_seed(5)
    bundle.classifier = build_classifier(bundle.config.classifier, 1).eval().requires_grad_(False)
    return bundle


def test_the_paired_residual_compares_with_the_plain_reconstruction_of_the_same_x_L() -> None:
    bundle = _lse_bundle()
    x = _slices(3)
    guided = explain_settings(bundle, scale=30.0, guidance="regions", residual="positive")
    paired = explain_settings(bundle, scale=30.0, guidance="regions", residual="positive", pairing="reconstruction")
    assert paired.decode_key == guided.decode_key  # the pairing only changes the map
    x_L = encode_slices(bundle, x, guided)
    plain = decode_slices(bundle, x_L, explain_settings(bundle, scale=0.0))
    healthy = decode_slices(bundle, x_L, guided)
    cache = SliceDecodings(bundle, x)
    against_input, against_plain = cache.explanation(guided), cache.explanation(paired)
    assert torch.allclose(against_input.anomaly_map, (x - healthy).clamp(min=0).sum(dim=1), atol=1e-6)
    assert torch.allclose(against_plain.anomaly_map, (plain - healthy).clamp(min=0).sum(dim=1), atol=1e-6)
    assert not torch.allclose(against_input.anomaly_map, against_plain.anomaly_map)
    # the s = 0 candidate of the same x_L is that reconstruction: evaluate decodes it once
    assert torch.equal(cache.explanation(explain_settings(bundle, scale=0.0)).x_healthy, against_plain.x_plain)
    assert torch.equal(explain_slices(bundle, x, paired).anomaly_map, against_plain.anomaly_map)


def test_one_channel_residual_and_its_checks() -> None:
    x, x_healthy = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(residual_map(x, x_healthy, "abs", channel=1), (x - x_healthy)[:, 1].abs())
    assert torch.allclose(residual_map(x, x_healthy, "abs"), (x - x_healthy).abs().sum(dim=1))
    bundle = tiny_bundle()
    with pytest.raises(ConfigError, match=r"residual channel must be 0\.\.0"):
        explain_settings(bundle, residual_channel=1)
    with pytest.raises(ConfigError, match="pairing must be input or reconstruction"):
        explain_settings(bundle, pairing="other")
    with pytest.raises(ConfigError, match="smoothing must be >= 0"):
        explain_settings(bundle, smooth=-1.0)


def test_masked_decoding_keeps_the_reconstruction_where_the_classifier_sees_no_lesion() -> None:
    bundle = _lse_bundle()
    x = _slices(4)
    all_in = MaskSettings(0.0, 0, 0)
    everywhere = explain_settings(bundle, scale=30.0, guidance="regions", decoding="masked", mask=all_in)
    guided = explain_settings(bundle, scale=30.0, guidance="regions")
    x_L = encode_slices(bundle, x, guided)
    mask = guidance_mask(bundle, x, replace(everywhere, amp=False))  # fp32, as the reference below
    gate = torch.softmax(bundle.classifier(x, torch.zeros(3, dtype=torch.long)), dim=1)[:, 1]
    assert torch.allclose(mask, gate.reshape(3, 1, 1, 1).expand(3, 1, 16, 16), atol=1e-6)  # threshold 0: all in
    decoded = counterfactuals(bundle, x_L, everywhere, x_0=x)
    plain = decode_slices(bundle, x_L, explain_settings(bundle, scale=0.0))
    assert decoded.plain is not None and torch.allclose(decoded.plain, plain, atol=1e-5)
    nowhere = replace(everywhere, mask=MaskSettings(0.999, 0, 0))  # no region that probable: all reconstruction
    assert float(guidance_mask(bundle, x, nowhere).max()) == 0.0
    assert torch.allclose(decode_slices(bundle, x_L, nowhere, x_0=x), plain, atol=1e-5)
    with pytest.raises(ConfigError, match="needs a classifier with pooling=lse"):
        explain_settings(tiny_bundle(), decoding="masked")


def test_method_keys_for_pairing_channel_smoothing_and_mask() -> None:
    cfg = load_config(TINY, ["classifier.pooling=lse", "data.image_channels=2"])
    m = parse_method("pm:p=rec,rc=0,sm=2,dec=masked,mt=0.3,md=1,ms=0.5,r=pos", cfg)
    assert (m.pairing, m.residual_channel, m.smooth) == ("reconstruction", 0, 2.0)
    assert m.mask == MaskSettings(0.3, 1, 0.5) and m.decoding == "masked"
    text = m.describe()
    assert "masked lockstep decoding (mask threshold 0.3, dilation 1, sigma 0.5)" in text
    assert "paired with the plain reconstruction" in text and "channel 0 only" in text and "sigma 2 px" in text
    for spec, message in (("x:mt=0.3", "add dec=masked"), ("x:p=nope", "p must be in or rec"), ("x:sm=a", "number")):
        with pytest.raises(ConfigError, match=message):
            parse_method(spec, cfg)


def test_a_gate_decodes_only_the_slices_the_classifier_calls_pathological() -> None:
    bundle = _lse_bundle()
    x = _slices(5)
    p_pathological = 1 - p_healthy_batched(bundle, x)
    gate = float(p_pathological.median())  # one slice below, two at or above
    keep = p_pathological >= gate
    assert 0 < int(keep.sum()) < 3
    ungated = explain_settings(bundle, scale=30.0, guidance="regions", pairing="reconstruction")
    gated = explain_settings(bundle, scale=30.0, guidance="regions", pairing="reconstruction", gate=gate)
    assert gated.decode_key != ungated.decode_key
    full, part = explain_slices(bundle, x, ungated), explain_slices(bundle, x, gated)
    assert torch.equal(part.x_healthy[~keep], x[~keep]) and float(part.anomaly_map[~keep].abs().max()) == 0.0
    # a slice is decoded alone or in a batch alike: the kept slices get the ungated counterfactual
    assert torch.allclose(part.x_healthy[keep], full.x_healthy[keep], atol=1e-5)
    assert torch.allclose(part.anomaly_map[keep], full.anomaly_map[keep], atol=1e-5)
    assert parse_method("g:gt=0.4", load_config(TINY)).gate == 0.4
    with pytest.raises(ConfigError, match=r"gate must be in \[0, 1\)"):
        explain_settings(bundle, gate=1.0)
