import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from anomaly_diffusion.diffusion.guidance import classifier_grad_fn, guided_eps, guided_eps_fn, region_grad_fn
from anomaly_diffusion.diffusion.sampling import ddim_decode, ddim_encode, ddim_grid, ddim_step
from anomaly_diffusion.diffusion.schedule import NoiseSchedule, make_schedule, q_sample
from anomaly_diffusion.labels import HEALTHY, PATHOLOGICAL


def oracle(schedule: NoiseSchedule, x_0: torch.Tensor):
    """The true noise of x_t for a known x_0: eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t)."""

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alpha_bar[t].double().reshape(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * x_0.double()) / (1 - a).sqrt()).to(x_t.dtype)

    return eps_fn


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize(("L", "K"), [(500, None), (500, 50), (999, 33), (1, None)])
def test_oracle_encode_decode_reproduces_input(kind: str, L: int, K: int | None) -> None:
    schedule = make_schedule(kind, 1000)
    x_0 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    eps_fn = oracle(schedule, x_0)
    x_L = ddim_encode(eps_fn, x_0, schedule, ddim_grid(L, K, schedule.num_timesteps))
    assert not torch.allclose(x_L, x_0)
    x_back = ddim_decode(eps_fn, x_L, schedule, ddim_grid(L, K, schedule.num_timesteps))
    assert torch.allclose(x_back, x_0, atol=1e-8)


@pytest.mark.parametrize(("L", "K"), [(200, None), (500, 25)])
def test_oracle_decode_from_forward_noised_input_reproduces_it(L: int, K: int | None) -> None:
    """The stochastic encoding (x_L ~ q(x_L | x_0), `noise` in `explain.ENCODINGS`) decodes to x_0 under an oracle."""
    schedule = make_schedule("linear", 1000)
    x_0 = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.full((2,), L, dtype=torch.long)
    x_L = q_sample(schedule, x_0, t, torch.randn(x_0.shape, generator=torch.Generator().manual_seed(1)).double())
    x_back = ddim_decode(oracle(schedule, x_0), x_L, schedule, ddim_grid(L, K, schedule.num_timesteps))
    assert torch.allclose(x_back, x_0, atol=1e-8)


def test_encode_and_decode_walk_mirrored_levels() -> None:
    schedule = make_schedule("linear", 1000)
    calls: list[int] = []

    def recording(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        return torch.zeros_like(x_t)

    x_0 = torch.randn(1, 1, 4, 4)
    x_L = ddim_encode(recording, x_0, schedule, ddim_grid(500, 5, schedule.num_timesteps))
    encode_calls, calls[:] = list(calls), []
    ddim_decode(recording, x_L, schedule, ddim_grid(500, 5, schedule.num_timesteps))
    # encode steps leave levels 0 (clean), 100, ..., 400 and arrive at 500;
    # decode leaves 500, ..., 100 and arrives at the clean image: the same levels backwards
    assert encode_calls == [0, 100, 200, 300, 400]
    assert calls == [500, 400, 300, 200, 100]
    # with eps = 0 the state is sqrt(alpha_bar) x_0 at every level: x_L lands exactly on level L
    assert torch.allclose(x_L, schedule.alpha_bar[500].sqrt() * x_0)


def test_encode_is_inverse_of_decode_for_x_independent_eps() -> None:
    schedule = make_schedule("cosine", 1000)
    e = torch.randn(2, 1, 6, 6, dtype=torch.float64)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return e * (1 + t.double().reshape(-1, 1, 1, 1) * 0)  # depends on nothing but is not zero

    x_L = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    x_0 = ddim_decode(eps_fn, x_L, schedule, ddim_grid(300, 30, schedule.num_timesteps))
    grid = ddim_grid(300, 30, schedule.num_timesteps)
    assert torch.allclose(ddim_encode(eps_fn, x_0, schedule, grid), x_L, atol=1e-9)


def _monai(schedule_steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
    scheduler.set_timesteps(schedule_steps)
    return scheduler


@pytest.mark.parametrize("t", [999, 500, 19, 0])
def test_ddim_step_equals_monai_step(t: int) -> None:
    schedule = make_schedule("linear", 1000)
    monai = _monai(50)
    assert torch.allclose(monai.alphas_cumprod.float(), schedule.alpha_bar, rtol=1e-5)
    x_t, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    expected, _ = monai.step(eps, t, x_t)
    prev = t - 1000 // 50
    alpha_prev = schedule.alpha_bar[prev] if prev >= 0 else torch.tensor(1.0)
    assert torch.allclose(ddim_step(x_t, eps, schedule.alpha_bar[t], alpha_prev), expected, atol=1e-5)


@pytest.mark.parametrize("t", [0, 480, 899])
def test_ddim_step_equals_monai_reversed_step(t: int) -> None:
    schedule = make_schedule("linear", 1000)
    monai = _monai(10)
    x_t, eps = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    expected, _ = monai.reversed_step(eps, t, x_t)
    actual = ddim_step(x_t, eps, schedule.alpha_bar[t], schedule.alpha_bar[t + 100])
    assert torch.allclose(actual, expected, atol=1e-5)


def test_ddim_step_with_eta_equals_monai() -> None:
    schedule = make_schedule("linear", 1000)
    monai = _monai(20)
    x_t, eps = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    expected, _ = monai.step(eps, 500, x_t, eta=0.7, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(eps.shape, generator=torch.Generator().manual_seed(3))
    actual = ddim_step(x_t, eps, schedule.alpha_bar[500], schedule.alpha_bar[450], eta=0.7, noise=noise)
    assert torch.allclose(actual, expected, atol=1e-5)


class LinearClassifier(torch.nn.Module):
    """logits = W flatten(x) + b: grad_x log softmax_y = W_y - sum_k p_k W_k in closed form."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_guidance_term_has_closed_form_for_linear_classifier() -> None:
    torch.manual_seed(0)
    schedule = make_schedule("linear", 1000)
    classifier = LinearClassifier(16).double()
    x_t = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([10, 400, 900])
    W = classifier.linear.weight.detach()  # (2, 16)
    p = torch.softmax(classifier(x_t, t), dim=1).detach()  # (3, 2)
    expected_grad = (W[HEALTHY] - p @ W).reshape(3, 1, 4, 4)
    grad = classifier_grad_fn(classifier, HEALTHY)(x_t, t)
    assert torch.allclose(grad, expected_grad, atol=1e-10)
    assert classifier.linear.weight.grad is None  # only the input gradient was computed

    eps = torch.randn_like(x_t)
    scale = 7.5
    a = schedule.alpha_bar[t].double().reshape(-1, 1, 1, 1)
    expected_eps = eps - scale * (1 - a).sqrt() * expected_grad
    assert torch.allclose(guided_eps(eps, grad, schedule.alpha_bar[t].double(), scale), expected_eps)
    wrapped = guided_eps_fn(lambda x, tt: eps, classifier_grad_fn(classifier, HEALTHY), schedule, scale)
    assert torch.allclose(wrapped(x_t, t), expected_eps.to(eps.dtype), atol=1e-6)
    # towards the other class: W_pathological - sum_k p_k W_k
    other = classifier_grad_fn(classifier, PATHOLOGICAL)(x_t, t)
    assert torch.allclose(other, (W[PATHOLOGICAL] - p @ W).reshape(3, 1, 4, 4), atol=1e-10)


def test_region_guidance_has_closed_form_for_linear_region_logits() -> None:
    """grad_x sum_p -softplus(a_p) with a_p = w_p . x is -sum_p sigmoid(a_p) w_p."""
    torch.manual_seed(0)
    regions = torch.nn.Linear(16, 5, bias=True).double()  # 5 regions, each a linear logit of the 4x4 image
    x_t = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([10, 400, 900])

    def region_logits(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return regions(x.flatten(1))  # (B, P)

    a = region_logits(x_t, t).detach()
    expected = -(torch.sigmoid(a) @ regions.weight.detach()).reshape(3, 1, 4, 4)
    grad = region_grad_fn(region_logits)(x_t, t)
    assert torch.allclose(grad, expected, atol=1e-10)
    assert regions.weight.grad is None
    # a region already judged healthy (a_p -> -inf) stops pulling; an abnormal one pulls with weight -> 1
    with torch.no_grad():
        regions.bias.copy_(torch.tensor([-1e3, 1e3, -1e3, -1e3, -1e3], dtype=torch.float64))
    grad = region_grad_fn(region_logits)(x_t, t)
    assert torch.allclose(grad, -regions.weight[1].detach().reshape(1, 1, 4, 4).expand(3, 1, 4, 4), atol=1e-10)


def test_guidance_moves_decoding_towards_healthy() -> None:
    torch.manual_seed(1)
    schedule = make_schedule("linear", 1000)
    classifier = LinearClassifier(16)
    x_0 = torch.randn(4, 1, 4, 4)
    eps_fn = oracle(schedule, x_0)
    x_L = ddim_encode(eps_fn, x_0, schedule, ddim_grid(300, 30, schedule.num_timesteps))
    guided = guided_eps_fn(eps_fn, classifier_grad_fn(classifier, HEALTHY), schedule, 5.0)
    x_healthy = ddim_decode(guided, x_L, schedule, ddim_grid(300, 30, schedule.num_timesteps))
    t0 = torch.zeros(4, dtype=torch.long)
    before = torch.softmax(classifier(x_0, t0), 1)[:, HEALTHY]
    after = torch.softmax(classifier(x_healthy, t0), 1)[:, HEALTHY]
    assert torch.all(after > before)


def test_scale_zero_is_plain_decoding() -> None:
    schedule = make_schedule("linear", 100)
    fn = lambda x, t: x * 0.1  # noqa: E731
    assert guided_eps_fn(fn, lambda x, t: x, schedule, 0.0) is fn


def test_eta_needs_noise_and_direction() -> None:
    schedule = make_schedule("linear", 100)
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError):
        ddim_step(x, x, schedule.alpha_bar[50], schedule.alpha_bar[40], eta=0.5)
    with pytest.raises(ValueError):
        ddim_step(x, x, schedule.alpha_bar[40], schedule.alpha_bar[50], eta=0.5, noise=x)
