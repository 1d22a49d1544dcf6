"""DDIM (Song et al. 2021): one step, deterministic encoding (inversion) and (guided) decoding.

Every function takes the denoiser as an argument (`EpsFn`): no network lives here, so the maths
can be tested with a closed-form oracle. Shapes are (B, C, *spatial) throughout; timesteps are
the 0-indexed training timesteps of `NoiseSchedule`. The timestep grid is made once, and checked
there, by `ddim_grid`, and passed in (as k-diffusion passes its sigmas).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from anomaly_diffusion.diffusion.schedule import NoiseSchedule
from anomaly_diffusion.errors import ConfigError

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""eps_theta(x_t, t): x_t (B, C, *spatial), t (B,) long -> predicted noise, same shape as x_t."""

StepCallback = Callable[[int, int], None]
"""Called after each step with (steps done, steps in total): progress without I/O in the maths."""


@dataclass(frozen=True)
class DdimGrid:
    """The increasing DDIM timesteps tau_1 < ... < tau_K = L that encode and decode share.

    Made (and checked) only by `ddim_grid`; `noise_level` is L, `steps` is K.
    """

    taus: tuple[int, ...]

    @property
    def noise_level(self) -> int:
        """L, the deepest level."""
        return self.taus[-1]

    @property
    def steps(self) -> int:
        """K, the number of DDIM steps."""
        return len(self.taus)


def ddim_grid(noise_level: int, steps: int | None, num_timesteps: int) -> DdimGrid:
    """The DDIM grid tau_k = round(k * L / K), k = 1..K: the one place L and K are checked.

    Encoding goes x_0 -> x_{tau_1} -> ... -> x_{tau_K}, decoding visits exactly the same levels
    backwards, x_{tau_K} -> ... -> x_{tau_1} -> x_0: the two are mirrored by construction, which
    fixes the off-by-one of the original code. K = L (steps None) visits every timestep 1..L.

    Args:
        noise_level: L, with 1 <= L <= T-1.
        steps: K, the number of DDIM steps, 1 <= K <= L; None means K = L.
        num_timesteps: T.

    Raises:
        ConfigError: L or K out of range.
    """
    if not 1 <= noise_level <= num_timesteps - 1:
        raise ConfigError(f"noise level must be in 1..{num_timesteps - 1} (1 <= L < T), got {noise_level}")
    k_steps = noise_level if steps is None else steps
    if not 1 <= k_steps <= noise_level:
        raise ConfigError(f"steps must be in 1..{noise_level} (the noise level), got {k_steps}")
    return DdimGrid(tuple(round(k * noise_level / k_steps) for k in range(1, k_steps + 1)))


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    alpha_bar_next: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Move x_t to the level alpha_bar_next with the DDIM update (Song 2021, eq. 12).

    1. x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)          (predicted x_0)
    2. sigma = eta * sqrt((1 - alpha_bar_next) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_next)
    3. x_next = sqrt(alpha_bar_next) x0_hat + sqrt(1 - alpha_bar_next - sigma^2) eps + sigma z

    With eta = 0 the step is deterministic and works in both directions: towards less noise
    (decoding, alpha_bar_next > alpha_bar_t) and towards more noise (encoding / inversion,
    alpha_bar_next < alpha_bar_t, where eta must be 0).

    Args:
        x_t: current state, (B, C, *spatial).
        eps: predicted noise at x_t, same shape.
        alpha_bar_t: alpha_bar of the current level, a 0-dim tensor.
        alpha_bar_next: alpha_bar of the target level (1 for the clean image), a 0-dim tensor.
        eta: stochasticity of DDIM (0 = deterministic).
        noise: z ~ N(0, I) for eta > 0, same shape as x_t.

    Returns:
        The state at the target level, same shape as x_t.
    """
    alpha_bar_t = alpha_bar_t.to(device=x_t.device, dtype=x_t.dtype)
    alpha_bar_next = alpha_bar_next.to(device=x_t.device, dtype=x_t.dtype)
    x0_hat = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    if eta == 0.0:
        return alpha_bar_next.sqrt() * x0_hat + (1 - alpha_bar_next).sqrt() * eps
    if alpha_bar_next < alpha_bar_t:
        raise ValueError("eta > 0 is only defined for steps towards less noise")
    if noise is None:
        raise ValueError("eta > 0 needs noise")
    sigma = eta * ((1 - alpha_bar_next) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_next)).sqrt()
    direction = (1 - alpha_bar_next - sigma**2).clamp(min=0).sqrt() * eps
    return alpha_bar_next.sqrt() * x0_hat + direction + sigma * noise


def _timestep_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def ddim_encode(
    eps_fn: EpsFn,
    x_0: torch.Tensor,
    schedule: NoiseSchedule,
    grid: DdimGrid,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 -> x_L, without guidance (Wolleb 2022, Alg. 1, encoding).

    Visits the levels x_0, x_{tau_1}, ..., x_{tau_K} (tau from `grid`); the step from
    level tau_{k-1} to tau_k evaluates eps_theta(x_{tau_{k-1}}, tau_{k-1}), with tau_0 = 0 as the
    network time of the clean image. `ddim_decode` walks the same levels backwards.

    Args:
        eps_fn: the denoiser eps_theta(x_t, t).
        x_0: images, (B, C, *spatial).
        schedule: the noise schedule the denoiser was trained with.
        grid: the levels tau_1..tau_K = L (`ddim_grid`).
        callback: progress, called with (k, K).

    Returns:
        x_L, same shape as x_0.
    """
    taus = grid.taus
    alpha_bar = schedule.alpha_bar.to(x_0.device)
    x = x_0
    level_prev, alpha_prev = 0, torch.ones((), device=x_0.device)
    with torch.no_grad():
        for k, tau in enumerate(taus, start=1):
            eps = eps_fn(x, _timestep_batch(level_prev, x))
            x = ddim_step(x, eps, alpha_prev, alpha_bar[tau])
            level_prev, alpha_prev = tau, alpha_bar[tau]
            if callback is not None:
                callback(k, len(taus))
    return x


def ddim_decode(
    eps_fn: EpsFn,
    x_L: torch.Tensor,
    schedule: NoiseSchedule,
    grid: DdimGrid,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM decoding x_L -> x_0_hat over the mirrored levels of `ddim_encode` (Song 2021, eq. 12).

    The step from tau_k to tau_{k-1} (tau_0 being the clean level, alpha_bar = 1) evaluates
    eps_fn(x_{tau_k}, tau_k). For classifier guidance pass a guided denoiser built with
    `anomaly_diffusion.diffusion.guidance.guided_eps_fn` (Wolleb 2022, Alg. 1, decoding).

    Args:
        eps_fn: the (possibly guided) denoiser.
        x_L: encoded images, (B, C, *spatial).
        schedule: the noise schedule.
        grid: the levels tau_1..tau_K = L (the level x_L is at); the encoder's for a mirrored walk.
        eta: DDIM stochasticity; 0 (the default) is deterministic.
        generator: random source for eta > 0.
        callback: progress, called with (k, K).

    Returns:
        x_0_hat, same shape as x_L.
    """
    taus = grid.taus
    alpha_bar = schedule.alpha_bar.to(x_L.device)
    levels = [*taus[::-1], None]
    x = x_L
    with torch.no_grad():
        for k in range(len(taus)):
            tau, tau_next = levels[k], levels[k + 1]
            assert tau is not None
            alpha_next = alpha_bar[tau_next] if tau_next is not None else torch.ones((), device=x.device)
            eps = eps_fn(x, _timestep_batch(tau, x))
            noise = None
            if eta > 0:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = ddim_step(x, eps, alpha_bar[tau], alpha_next, eta=eta, noise=noise)
            if callback is not None:
                callback(k + 1, len(taus))
    return x


def masked_ddim_decode(
    eps_hat_fn: EpsFn,
    eps_fn: EpsFn,
    x_L: torch.Tensor,
    schedule: NoiseSchedule,
    grid: DdimGrid,
    mask: torch.Tensor,
    callback: StepCallback | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two DDIM decodings of the same x_L in lockstep, merged through a soft mask (Dif-fuse, Fontanella 2024).

    At each step tau_k -> tau_{k-1} of the mirrored grid (tau_0 the clean level):

        r_{k-1} = DDIM(r_k, eps_theta(r_k, tau_k))                  the plain reconstruction
        g'      = DDIM(g_k, eps_hat(g_k, tau_k))                     the guided decoding
        g_{k-1} = M g' + (1 - M) r_{k-1}                             healthy tissue follows r

    with r_K = g_K = x_L. M = 1 everywhere is the guided decoding beside the plain one (the pair of
    the paired residual); M = 0 everywhere gives g = r.

    Args:
        eps_hat_fn: the guided denoiser eps_hat(x_t, t).
        eps_fn: the plain denoiser eps_theta(x_t, t).
        x_L: encoded images, (B, C, *spatial).
        schedule: the noise schedule.
        grid: the levels tau_1..tau_K = L.
        mask: M in [0, 1], broadcastable to x_L, e.g. (B, 1, *spatial).
        callback: progress, called with (k, K).

    Returns:
        (g_0, r_0): the counterfactual and the plain reconstruction, each shaped as x_L.
    """
    taus = grid.taus
    alpha_bar = schedule.alpha_bar.to(x_L.device)
    levels = [*taus[::-1], None]
    mask = mask.to(device=x_L.device, dtype=x_L.dtype)
    guided, plain = x_L, x_L
    with torch.no_grad():  # a classifier gradient enables grad itself (`guidance.classifier_grad_fn`)
        for k in range(len(taus)):
            tau, tau_next = levels[k], levels[k + 1]
            assert tau is not None
            alpha_next = alpha_bar[tau_next] if tau_next is not None else torch.ones((), device=x_L.device)
            t = _timestep_batch(tau, x_L)
            plain = ddim_step(plain, eps_fn(plain, t), alpha_bar[tau], alpha_next)
            merged = mask * ddim_step(guided, eps_hat_fn(guided, t), alpha_bar[tau], alpha_next)
            guided = merged + (1 - mask) * plain
            if callback is not None:
                callback(k + 1, len(taus))
    return guided, plain


def ddim_sample(
    eps_fn: EpsFn,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    steps: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Unconditional samples: x_{T-1} ~ N(0, I) decoded by deterministic DDIM in K steps. (B, C, *spatial)."""
    x_T = torch.randn(shape, generator=generator).to(device)
    last = schedule.num_timesteps - 1
    return ddim_decode(eps_fn, x_T, schedule, ddim_grid(last, min(steps, last), schedule.num_timesteps))
