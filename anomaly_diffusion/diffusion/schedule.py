"""The noise schedule of a DDPM (Ho et al. 2020) and the forward process q(x_t | x_0).

Indexing follows MONAI and diffusers: timesteps t = 0..T-1, beta_t as listed, and
alpha_bar_t = prod_{s=0..t} (1 - beta_s), so a state x_t has the marginal

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)            (Ho 2020, eq. 4)

The clean image x_0 is the level with alpha_bar = 1; it is not a timestep of the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from anomaly_diffusion.errors import ConfigError

ScheduleKind = Literal["linear", "cosine"]


@dataclass(frozen=True)
class NoiseSchedule:
    """An immutable beta schedule: computed in float64, stored as float32 tensors of shape (T,)."""

    kind: ScheduleKind
    betas: torch.Tensor
    alpha_bar: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return int(self.betas.shape[0])

    def to_dict(self) -> dict[str, object]:
        """Plain data for a model bundle (loadable with ``torch.load(weights_only=True)``)."""
        return {"kind": self.kind, "betas": self.betas.clone(), "alpha_bar": self.alpha_bar.clone()}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> NoiseSchedule:
        """Inverse of `to_dict`."""
        betas, alpha_bar, kind = data.get("betas"), data.get("alpha_bar"), data.get("kind")
        if (
            not isinstance(betas, torch.Tensor)
            or not isinstance(alpha_bar, torch.Tensor)
            or betas.shape != alpha_bar.shape
            or betas.dim() != 1
            or kind not in ("linear", "cosine")
        ):
            raise ConfigError("schedule in bundle is malformed")
        return NoiseSchedule(kind=kind, betas=betas.float(), alpha_bar=alpha_bar.float())


def _from_betas(kind: ScheduleKind, betas64: torch.Tensor) -> NoiseSchedule:
    alpha_bar64 = torch.cumprod(1.0 - betas64, dim=0)
    return NoiseSchedule(kind=kind, betas=betas64.float(), alpha_bar=alpha_bar64.float())


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear betas of Ho et al. 2020, in float64, shape (T,)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine betas of Nichol & Dhariwal 2021 (eq. 17), in float64, shape (T,).

    alpha_bar(t) = f(t) / f(0) with f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2, and
    beta_t = min(1 - alpha_bar(t+1) / alpha_bar(t), max_beta).
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_schedule(
    kind: ScheduleKind = "linear",
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> NoiseSchedule:
    """Build a `NoiseSchedule` of the given kind (beta_start/beta_end apply to 'linear')."""
    if num_timesteps < 2:
        raise ConfigError(f"schedule.num_timesteps must be >= 2, got {num_timesteps}")
    if kind == "linear":
        if not 0 < beta_start < beta_end < 1:
            raise ConfigError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        return _from_betas(kind, linear_betas(num_timesteps, beta_start, beta_end))
    if kind == "cosine":
        return _from_betas(kind, cosine_betas(num_timesteps))
    raise ConfigError(f"unknown schedule kind {kind!r}; use 'linear' or 'cosine'")


def broadcast_to(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample values (B,) to (B, 1, ..., 1) so they broadcast against x (B, C, *spatial)."""
    return values.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def q_sample(schedule: NoiseSchedule, x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho 2020, eq. 4).

    Args:
        schedule: the noise schedule.
        x_0: clean images, (B, C, *spatial).
        t: timesteps in 0..T-1, (B,) long.
        noise: eps ~ N(0, I), same shape as x_0 (passed in: randomness is the caller's).

    Returns:
        x_t, same shape as x_0.
    """
    alpha_bar_t = broadcast_to(schedule.alpha_bar.to(t.device)[t], x_0)
    return alpha_bar_t.sqrt() * x_0 + (1 - alpha_bar_t).sqrt() * noise
