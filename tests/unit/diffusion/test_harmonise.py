"""THOR's harmonised decoding against exact answers: plain DDIM when off, the input's own trajectory when healthy."""

from __future__ import annotations

import pytest
import torch

from anomaly_diffusion.diffusion.harmonise import (
    Harmonisation,
    harmonised_decode,
    harmonised_levels,
    healthy_weight,
    implied_noise,
)
from anomaly_diffusion.diffusion.sampling import ddim_decode, ddim_encode, ddim_grid
from anomaly_diffusion.diffusion.schedule import make_schedule, q_sample
from anomaly_diffusion.errors import ConfigError

SCHEDULE = make_schedule("linear", 1000)


def oracle(x_target: torch.Tensor):  # type: ignore[no-untyped-def]
    """eps that leads exactly to x_target from any x_t: (x_t - sqrt(ab_t) x_target) / sqrt(1 - ab_t)."""

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = SCHEDULE.alpha_bar[t].double().reshape(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - a.sqrt() * x_target) / (1 - a).sqrt()

    return eps_fn


def recording(eps_fn, seen: dict[int, torch.Tensor]):  # type: ignore[no-untyped-def]
    """eps_fn that keeps the state it was called with at each level."""

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen[int(t[0])] = x_t.clone()
        return eps_fn(x_t, t)

    return fn


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(x_0.shape, generator=g, dtype=torch.float64)
    return x_0, noise, q_sample(SCHEDULE, x_0, torch.full((2,), 400, dtype=torch.long), noise)


def _toy_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A denoiser that is no oracle (its x0_hat differs from the input everywhere)."""
    return 0.3 * x_t + 0.01 * t.double().reshape(-1, 1, 1, 1)


def test_without_levels_or_with_an_all_anomalous_map_it_is_ddim_decode_exactly() -> None:
    x_0, _, x_L = _inputs()
    grid = ddim_grid(400, 8, 1000)
    expected = ddim_decode(_toy_eps, x_L, SCHEDULE, grid)
    assert torch.equal(harmonised_decode(_toy_eps, x_L, x_0, SCHEDULE, grid, (), Harmonisation()), expected)
    everywhere = Harmonisation(threshold=0.0, dilation=0)  # any residual is anomalous: w = 1 everywhere
    levels = harmonised_levels(grid, 7)
    assert torch.equal(harmonised_decode(_toy_eps, x_L, x_0, SCHEDULE, grid, levels, everywhere), expected)


@pytest.mark.parametrize("soft", [False, True])
def test_an_all_healthy_map_walks_the_inputs_own_noised_trajectory(soft: bool) -> None:
    x_0, noise, x_L = _inputs(1)
    grid = ddim_grid(400, 8, 1000)  # levels 50, 100, ..., 400
    levels = harmonised_levels(grid, 7)
    assert levels == (350, 300, 250, 200, 150, 100, 50)
    seen: dict[int, torch.Tensor] = {}
    healthy = Harmonisation(threshold=1e9, dilation=2, soft=soft)
    harmonised_decode(recording(_toy_eps, seen), x_L, x_0, SCHEDULE, grid, levels, healthy)
    for tau in levels:  # the state the decoder sees at each level is q(x_tau | x_0) with the encoding's noise
        expected = q_sample(SCHEDULE, x_0, torch.full((2,), tau, dtype=torch.long), noise)
        if soft:  # w = m / 1e9 is tiny, not zero
            assert torch.allclose(seen[tau], expected, atol=1e-7)
        else:
            assert torch.allclose(seen[tau], expected, atol=1e-12)
    # the noise read off a forward-noising encoding is the drawn noise
    assert torch.allclose(implied_noise(x_L, x_0, SCHEDULE.alpha_bar[400].double()), noise, atol=1e-12)


def test_an_oracle_of_the_input_reconstructs_it_after_ddim_inversion() -> None:
    x_0, _, _ = _inputs(2)
    grid = ddim_grid(300, 6, 1000)
    x_L = ddim_encode(oracle(x_0), x_0, SCHEDULE, grid)
    out = harmonised_decode(oracle(x_0), x_L, x_0, SCHEDULE, grid, harmonised_levels(grid, 3), Harmonisation())
    assert torch.allclose(out, x_0, atol=1e-9)


def test_healthy_pixels_follow_the_input_and_the_lesion_follows_the_decoder() -> None:
    """An oracle of a healthy x_h: the lesion square (x_0 - x_h = 3) is repainted, the rest keeps x_0 trajectory."""
    x_h = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    x_0 = x_h.clone()
    x_0[..., 6:10, 6:10] = 3.0
    noise = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grid = ddim_grid(500, 10, 1000)
    x_L = q_sample(SCHEDULE, x_0, torch.full((1,), 500, dtype=torch.long), noise)
    seen: dict[int, torch.Tensor] = {}
    levels = harmonised_levels(grid, 4)
    harmonisation = Harmonisation(threshold=1.0, dilation=1)
    out = harmonised_decode(recording(oracle(x_h), seen), x_L, x_0, SCHEDULE, grid, levels, harmonisation)
    assert torch.allclose(out, x_h, atol=1e-9)  # an oracle's x0_hat is x_h whatever the state
    inside = torch.zeros_like(x_0, dtype=torch.bool)
    inside[..., 5:11, 5:11] = True  # the square dilated by one pixel
    for tau in levels:
        input_path = q_sample(SCHEDULE, x_0, torch.full((1,), tau, dtype=torch.long), noise)
        assert torch.allclose(seen[tau][~inside], input_path[~inside], atol=1e-12)
        assert not torch.allclose(seen[tau][inside], input_path[inside])


def test_healthy_weight_hard_soft_and_dilated() -> None:
    x_0 = torch.zeros(1, 2, 5, 5)
    x0_hat = torch.zeros(1, 2, 5, 5)
    x0_hat[0, 0, 2, 2], x0_hat[0, 1, 2, 2] = 0.5, -0.25  # m = 0.75 at the centre only
    x0_hat[0, 0, 0, 4] = 0.2
    hard = healthy_weight(x0_hat, x_0, Harmonisation(threshold=0.5, dilation=0))
    assert hard.shape == (1, 1, 5, 5) and hard.sum() == 1 and hard[0, 0, 2, 2] == 1
    dilated = healthy_weight(x0_hat, x_0, Harmonisation(threshold=0.5, dilation=1))
    assert dilated.sum() == 9 and dilated[0, 0, 1:4, 1:4].eq(1).all()
    soft = healthy_weight(x0_hat, x_0, Harmonisation(threshold=1.0, dilation=0, soft=True))
    assert soft[0, 0, 2, 2] == pytest.approx(0.75) and soft[0, 0, 0, 4] == pytest.approx(0.2) and soft[0, 0, 0, 0] == 0


def test_levels_are_checked_and_spread() -> None:
    grid = ddim_grid(100, 10, 1000)
    assert harmonised_levels(grid, 0) == ()
    assert harmonised_levels(grid, 1) == (90,)
    assert harmonised_levels(grid, 3) == (90, 50, 10)
    assert harmonised_levels(grid, 50) == (90, 80, 70, 60, 50, 40, 30, 20, 10)
    assert harmonised_levels(ddim_grid(5, 1, 1000), 3) == ()  # one step: nothing between L and 0
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ConfigError, match="among the decode levels"):
        harmonised_decode(_toy_eps, x, x, SCHEDULE, grid, (55,), Harmonisation())
    with pytest.raises(ConfigError, match="threshold >= 0"):
        Harmonisation(threshold=-1)
