"""The encodings registry (`diffusion/encoding.py`): exact answers from an oracle denoiser and closed forms."""

import pytest
import torch

from anomaly_diffusion.diffusion.encoding import ENCODINGS, NOISE_CELL_ENCODINGS, EncodeContext, is_stochastic
from anomaly_diffusion.diffusion.sampling import ddim_decode, ddim_encode, ddim_grid
from anomaly_diffusion.diffusion.schedule import make_schedule, q_sample


def _oracle(schedule, x_0: torch.Tensor):
    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alpha_bar[t].double().reshape(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * x_0.double()) / (1 - a).sqrt()).to(x_t.dtype)

    return eps_fn


def test_the_registry_names_the_deterministic_and_the_stochastic_encodings() -> None:
    assert ENCODINGS.names()[:4] == ("ddim", "noise", "coarse", "simplex")
    assert [is_stochastic(n) for n in ("ddim", "noise", "coarse", "simplex")] == [False, True, True, True]
    assert set(NOISE_CELL_ENCODINGS) <= set(ENCODINGS.names())


def test_ddim_inversion_in_batches_equals_one_call_and_an_oracle_decodes_it_back() -> None:
    schedule, grid = make_schedule(), ddim_grid(300, 30, 1000)
    x_0 = torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    # a linear denoiser, so the batches of 2 must agree with one call on all 5 slices
    eps_fn = lambda x_t, t: 0.1 * x_t  # noqa: E731
    batched = ENCODINGS.get("ddim").function(eps_fn, x_0, schedule, grid, EncodeContext(batch_size=2))
    torch.testing.assert_close(batched, ddim_encode(eps_fn, x_0, schedule, grid))
    oracle = _oracle(schedule, x_0)
    x_L = ENCODINGS.get("ddim").function(oracle, x_0, schedule, grid, EncodeContext(batch_size=5))
    torch.testing.assert_close(ddim_decode(oracle, x_L, schedule, grid), x_0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["noise", "coarse", "simplex"])
def test_forward_noising_is_q_sample_of_its_seeded_draw_whatever_the_batch_size(name: str) -> None:
    schedule, grid = make_schedule(), ddim_grid(250, 10, 1000)
    x_0 = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    encode = ENCODINGS.get(name).function
    a = encode(None, x_0, schedule, grid, EncodeContext(seed=7, noise_cell=4, batch_size=1))
    b = encode(None, x_0, schedule, grid, EncodeContext(seed=7, noise_cell=4, batch_size=3))
    torch.testing.assert_close(a, b)
    # x_L = sqrt(ab_L) x_0 + sqrt(1 - ab_L) eps, so eps is recovered exactly and has unit scale
    ab = schedule.alpha_bar[250].double()
    eps = (a.double() - ab.sqrt() * x_0.double()) / (1 - ab).sqrt()
    t = torch.full((3,), 250, dtype=torch.long)
    torch.testing.assert_close(q_sample(schedule, x_0, t, eps.float()), a)
    assert 0.5 < float(eps.std()) < 1.5
    other = encode(None, x_0, schedule, grid, EncodeContext(seed=8, noise_cell=4))
    assert not torch.allclose(a, other)


def test_the_encoder_returns_x_L_through_the_context_device_move() -> None:
    moved: list[tuple[int, ...]] = []

    def to_device(t: torch.Tensor) -> torch.Tensor:
        moved.append(tuple(t.shape))
        return t

    x_0 = torch.zeros(5, 1, 4, 4)
    schedule, grid = make_schedule(), ddim_grid(10, 2, 1000)
    ENCODINGS.get("ddim").function(
        lambda x, t: x, x_0, schedule, grid, EncodeContext(batch_size=2, to_device=to_device)
    )
    assert moved == [(2, 1, 4, 4), (2, 1, 4, 4), (1, 1, 4, 4)]
    moved.clear()
    ENCODINGS.get("noise").function(None, x_0, schedule, grid, EncodeContext(to_device=to_device))
    assert moved == [(5, 1, 4, 4)]
