import math

import pytest
import torch

from anomaly_diffusion.diffusion.sampling import ddim_grid
from anomaly_diffusion.diffusion.schedule import (
    NoiseSchedule,
    cosine_betas,
    linear_betas,
    make_schedule,
    q_sample,
)
from anomaly_diffusion.errors import ConfigError


def ddim_timesteps(noise_level: int, steps: int | None, num_timesteps: int) -> list[int]:
    return list(ddim_grid(noise_level, steps, num_timesteps).taus)


def test_linear_schedule_matches_ho_2020() -> None:
    schedule = make_schedule("linear", 1000)
    assert schedule.betas.dtype == torch.float32
    assert schedule.betas[0].item() == pytest.approx(1e-4)
    assert schedule.betas[-1].item() == pytest.approx(0.02)
    expected = torch.cumprod(1 - linear_betas(1000), 0)
    assert torch.allclose(schedule.alpha_bar.double(), expected, rtol=1e-6)
    # alpha_bar_T of Ho's schedule is about 4e-5
    assert schedule.alpha_bar[-1].item() == pytest.approx(4.04e-5, rel=0.02)


def test_cosine_schedule_closed_form() -> None:
    T, s = 1000, 0.008
    schedule = make_schedule("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert schedule.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert (cosine_betas(T) <= 0.999).all()
    assert torch.all(schedule.alpha_bar[1:] < schedule.alpha_bar[:-1])


def test_schedule_is_immutable_and_round_trips() -> None:
    schedule = make_schedule("linear", 50)
    with pytest.raises(AttributeError):
        schedule.kind = "cosine"  # type: ignore[misc]
    again = NoiseSchedule.from_dict(schedule.to_dict())
    assert torch.equal(again.alpha_bar, schedule.alpha_bar)


def test_q_sample_is_the_closed_form_marginal() -> None:
    schedule = make_schedule("linear", 1000)
    x_0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn_like(x_0)
    t = torch.tensor([0, 499, 999])
    x_t = q_sample(schedule, x_0, t, noise)
    for i in range(3):
        a = schedule.alpha_bar[t[i]]
        assert torch.allclose(x_t[i], a.sqrt() * x_0[i] + (1 - a).sqrt() * noise[i])


def test_ddim_timesteps_end_at_L_and_stride() -> None:
    assert ddim_timesteps(5, None, 1000) == [1, 2, 3, 4, 5]
    assert ddim_timesteps(500, 50, 1000) == list(range(10, 501, 10))
    taus = ddim_timesteps(100, 7, 1000)
    assert taus[-1] == 100 and len(taus) == 7 and taus == sorted(set(taus))


@pytest.mark.parametrize(("L", "K"), [(0, None), (1000, None), (-3, None), (10, 11), (10, 0)])
def test_ddim_timesteps_range_errors(L: int, K: int | None) -> None:
    with pytest.raises(ConfigError):
        ddim_timesteps(L, K, 1000)


def test_make_schedule_rejects_bad_values() -> None:
    with pytest.raises(ConfigError):
        make_schedule("linear", 1)
    with pytest.raises(ConfigError):
        make_schedule("linear", 100, beta_start=0.1, beta_end=0.01)
