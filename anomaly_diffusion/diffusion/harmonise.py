"""Harmonised DDIM decoding (THOR, Bercea et al. 2024, "Diffusion models with implicit guidance for
medical anomaly detection").

A high noise level L removes a whole lesion but also makes the decoder repaint healthy tissue
from its prior; a low L keeps the patient's tissue but leaves the lesion's rim. THOR lets a high
L keep the patient's own healthy tissue: at a few levels of the decode, where the current map
says healthy, the state is replaced by the input noised to that level, so only the anomalous
part is repainted. At decode step tau_k -> tau_{k-1} (levels of `DdimGrid`, tau_0 = 0 clean):

    eps      = eps_theta(x_{tau_k}, tau_k)                          (guided or not: the caller's eps_fn)
    x0_hat   = (x_{tau_k} - sqrt(1 - ab_k) eps) / sqrt(ab_k)        (the current counterfactual)
    x_next   = DDIM step to tau_{k-1}                               (Song 2021, eq. 12)
    if tau_{k-1} is a harmonised level:
        m    = maxpool_d(sum_c |x0_hat - x_0|)                      (B, 1, *spatial), dilated by d pixels
        w    = 1[m > threshold]          or  clip(m / threshold, 0, 1) (soft)
        x_next = w x_next + (1 - w) q(x_{tau_{k-1}} | x_0; eps_0)   q = sqrt(ab) x_0 + sqrt(1 - ab) eps_0

with eps_0 the encoding's noise. By default eps_0 is read off the encoding itself,
eps_0 = (x_L - sqrt(ab_L) x_0) / sqrt(1 - ab_L): the drawn noise for a forward-noising encoding
(x_L = q(x_L | x_0; eps) exactly), the effective noise of a DDIM inversion. A healthy pixel thus
walks the input's own noised trajectory, and a map that is healthy everywhere gives
x_tau = q(x_tau | x_0; eps_0) at every harmonised level.

THOR's code re-noises w x0_hat + (1 - w) x_0 instead, which also replaces the decoder's eps by
eps_0 inside the lesion; blending the states keeps the decoder's trajectory there (as RePaint's
known/unknown blend), so with w = 1 everywhere this is plain DDIM, bit for bit. THOR's anomaly map
also multiplies the residual by a perceptual (LPIPS) map; ours is the plain residual, dilated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anomaly_diffusion.diffusion.sampling import DdimGrid, EpsFn, StepCallback, ddim_step
from anomaly_diffusion.diffusion.schedule import NoiseSchedule
from anomaly_diffusion.errors import ConfigError


@dataclass(frozen=True)
class Harmonisation:
    """How `harmonised_decode` harmonises (THOR).

    Attributes:
        levels: how many decode levels are harmonised, spread evenly over tau_1..tau_{K-1}
            (`harmonised_levels`); 0 is plain DDIM.
        threshold: m above it is anomalous (hard) or fully kept (soft); normalised units summed over channels.
        dilation: the map is max-pooled over (2 dilation + 1)^d pixels before thresholding, so the
            lesion's rim stays with the decoder (THOR dilates its map for the same reason).
        soft: blend with w = clip(m / threshold, 0, 1) instead of the hard 1[m > threshold].
    """

    levels: int = 4
    threshold: float = 0.5
    dilation: int = 1
    soft: bool = False

    def __post_init__(self) -> None:
        if self.levels < 0 or self.threshold < 0 or self.dilation < 0:
            raise ConfigError(
                f"harmonisation needs levels >= 0, threshold >= 0 and dilation >= 0, got "
                f"{self.levels}, {self.threshold}, {self.dilation}"
            )


def harmonised_levels(grid: DdimGrid, count: int) -> tuple[int, ...]:
    """`count` levels among tau_1..tau_{K-1}, evenly spread from the deepest down (all of them if fewer).

    tau_K = L is the encoding itself and the clean level 0 is the output: neither is harmonised.
    """
    inner = grid.taus[:-1][::-1]  # decode order, deepest first
    if count <= 0 or not inner:
        return ()
    if count >= len(inner):
        return tuple(inner)
    picks = {round(i * (len(inner) - 1) / max(count - 1, 1)) for i in range(count)} if count > 1 else {0}
    return tuple(inner[i] for i in sorted(picks))


def implied_noise(x_L: torch.Tensor, x_0: torch.Tensor, alpha_bar_L: torch.Tensor) -> torch.Tensor:
    """eps_0 with x_L = sqrt(ab_L) x_0 + sqrt(1 - ab_L) eps_0: the noise an encoding put on x_0. Same shape."""
    alpha_bar_L = alpha_bar_L.to(device=x_L.device, dtype=x_L.dtype)
    return (x_L - alpha_bar_L.sqrt() * x_0) / (1 - alpha_bar_L).sqrt()


def healthy_weight(x0_hat: torch.Tensor, x_0: torch.Tensor, harmonisation: Harmonisation) -> torch.Tensor:
    """w in [0, 1], (B, 1, *spatial): 1 keeps the decoder's state (anomalous), 0 takes the input's.

    m = maxpool over (2d + 1)^n pixels of sum_c |x0_hat - x_0|; w = 1[m > threshold], or
    clip(m / threshold, 0, 1) when soft (w = 1 where m > 0 if threshold = 0).
    """
    m = (x0_hat - x_0).abs().sum(dim=1, keepdim=True)
    d = harmonisation.dilation
    if d > 0:
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[m.dim() - 2]
        m = pool(m, kernel_size=2 * d + 1, stride=1, padding=d)
    if not harmonisation.soft:
        return (m > harmonisation.threshold).to(x_0.dtype)
    if harmonisation.threshold == 0:
        return (m > 0).to(x_0.dtype)
    return (m / harmonisation.threshold).clamp(0, 1)


def harmonised_decode(
    eps_fn: EpsFn,
    x_L: torch.Tensor,
    x_0: torch.Tensor,
    schedule: NoiseSchedule,
    grid: DdimGrid,
    levels: Sequence[int],
    harmonisation: Harmonisation,
    noise: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM decoding x_L -> x0_hat, harmonised with the input x_0 at `levels` (module docstring).

    With no levels (or a map that is anomalous everywhere) this is `ddim_decode` exactly.

    Args:
        eps_fn: the (possibly guided) denoiser.
        x_L: encoded images, (B, C, *spatial), at level tau_K = L of `grid`.
        x_0: the inputs that were encoded, same shape.
        schedule: the noise schedule.
        grid: the levels tau_1..tau_K.
        levels: harmonised levels, each one of tau_1..tau_{K-1} (`harmonised_levels`).
        harmonisation: the map's threshold, dilation and hard/soft weight.
        noise: eps_0 of q(x_t | x_0; eps_0), same shape; None reads it off the encoding (`implied_noise`).
        callback: progress, called with (k, K).

    Returns:
        x0_hat, same shape as x_L.
    """
    taus = grid.taus
    wanted = set(levels)
    if not wanted <= set(taus[:-1]):
        raise ConfigError(f"harmonised levels must be among the decode levels {taus[:-1]}, got {sorted(wanted)}")
    alpha_bar = schedule.alpha_bar.to(x_L.device)
    eps_0 = implied_noise(x_L, x_0, alpha_bar[taus[-1]]) if noise is None and wanted else noise
    path = [*taus[::-1], None]
    x = x_L
    with torch.no_grad():
        for k in range(len(taus)):
            tau, tau_next = path[k], path[k + 1]
            assert tau is not None
            alpha_next = alpha_bar[tau_next] if tau_next is not None else torch.ones((), device=x.device)
            eps = eps_fn(x, torch.full((x.shape[0],), tau, dtype=torch.long, device=x.device))
            x_next = ddim_step(x, eps, alpha_bar[tau], alpha_next)
            if tau_next in wanted:
                assert eps_0 is not None
                a = alpha_bar[tau].to(x.dtype)
                x0_hat = (x - (1 - a).sqrt() * eps) / a.sqrt()
                w = healthy_weight(x0_hat, x_0, harmonisation)
                noised_input = alpha_next.sqrt() * x_0 + (1 - alpha_next).sqrt() * eps_0
                x_next = w * x_next + (1 - w) * noised_input
            x = x_next
            if callback is not None:
                callback(k + 1, len(taus))
    return x
