"""The encodings x_0 -> x_L, by name: deterministic DDIM inversion (Wolleb 2022) or forward noising
q(x_L | x_0) with white, coarse (Kascenas 2023) or simplex (Wyatt 2022, AnoDDPM) noise.

Every encoder has one signature, so explain, evaluate's `enc=` key and the `--encoding` flag take
any registered name (the counterpart of `decoding.py`):

    encoder(eps_theta, x_0, schedule, grid, context) -> x_L

x_0 is the whole stack of slices (N, C, *spatial) on the CPU; the encoder moves batches to the
model's device through `context.to_device` and returns x_L there. No network lives here: eps_theta
is an argument, so an encoder is tested with an oracle denoiser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from anomaly_diffusion.diffusion.noise import coarse_noise, simplex_noise
from anomaly_diffusion.diffusion.sampling import DdimGrid, EpsFn, ddim_encode
from anomaly_diffusion.diffusion.schedule import NoiseSchedule, q_sample
from anomaly_diffusion.registry import Registry


def _same_device(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class EncodeContext:
    """What an encoder may use besides eps_theta, x_0, the schedule and the grid.

    Attributes:
        seed: the draw of a stochastic encoding.
        noise_cell: cell size in pixels of the coarse and simplex noise.
        batch_size: slices per network batch (DDIM inversion).
        to_device: moves a CPU tensor to the model's device.
    """

    seed: int = 0
    noise_cell: int = 4
    batch_size: int = 32
    to_device: Callable[[torch.Tensor], torch.Tensor] = _same_device


Encoder = Callable[[EpsFn, torch.Tensor, NoiseSchedule, DdimGrid, EncodeContext], torch.Tensor]
"""(eps_theta, x_0 (N, C, *spatial) on the CPU, schedule, grid, context) -> x_L (N, C, *spatial) on the device."""

NoiseFn = Callable[[tuple[int, ...], torch.Generator, EncodeContext], torch.Tensor]
"""(shape (N, C, *spatial), seeded generator, context) -> eps of that shape, unit variance per pixel."""


def ddim_inversion(
    eps_fn: EpsFn, x_0: torch.Tensor, schedule: NoiseSchedule, grid: DdimGrid, context: EncodeContext
) -> torch.Tensor:
    """x_L = ddim_encode(eps_theta, x_0, L), batch by batch, under `torch.inference_mode` (no guidance)."""
    encoded = []
    with torch.inference_mode():
        for start in range(0, x_0.shape[0], context.batch_size):
            batch = context.to_device(x_0[start : start + context.batch_size])
            encoded.append(ddim_encode(eps_fn, batch, schedule, grid))
    return torch.cat(encoded) if encoded else x_0.clone()


def forward_noising(noise_fn: NoiseFn) -> Encoder:
    """The encoding x_L = q(x_L | x_0; eps) = sqrt(alpha_bar_L) x_0 + sqrt(1 - alpha_bar_L) eps (Ho 2020, eq. 4).

    eps = noise_fn(shape, generator seeded with `context.seed`, context), drawn for the whole stack at
    once (so a draw does not depend on the batch size). No network evaluations: the decoding then
    samples a healthy image near x_0 rather than inverting it exactly.
    """

    def encode(
        eps_fn: EpsFn, x_0: torch.Tensor, schedule: NoiseSchedule, grid: DdimGrid, context: EncodeContext
    ) -> torch.Tensor:
        noise = noise_fn(tuple(x_0.shape), torch.Generator().manual_seed(context.seed), context)
        t = torch.full((x_0.shape[0],), grid.noise_level, dtype=torch.long)
        return context.to_device(q_sample(schedule, x_0, t, noise))

    return encode


ENCODINGS: Registry[Encoder] = Registry("encoding")
_STOCHASTIC: set[str] = set()
NOISE_CELL_ENCODINGS = ("coarse", "simplex")
"""The encodings that use the noise cell."""


def register_noise_encoding(name: str, noise_fn: NoiseFn, description: str) -> None:
    """Register a stochastic encoding (forward noising with `noise_fn`): a new draw per seed."""
    ENCODINGS.register(name, forward_noising(noise_fn), description)
    _STOCHASTIC.add(name)


def is_stochastic(encoding: str) -> bool:
    """Whether an encoding draws noise (its seed matters: an ensemble can average several draws)."""
    return encoding in _STOCHASTIC


ENCODINGS.register("ddim", ddim_inversion, "deterministic DDIM inversion (the paper)")
register_noise_encoding(
    "noise",
    lambda shape, generator, context: torch.randn(shape, generator=generator),
    "forward noising x_L ~ q(x_L | x_0), one draw per seed",
)
register_noise_encoding(
    "coarse",
    lambda shape, generator, context: coarse_noise(shape, context.noise_cell, generator),
    "forward noising with coarse Gaussian noise (drawn every noise_cell pixels, upsampled; Kascenas 2023)",
)
register_noise_encoding(
    "simplex",
    lambda shape, generator, context: simplex_noise(shape, context.noise_cell, generator),
    "forward noising with 6-octave simplex noise (coarsest octave noise_cell pixels; Wyatt 2022, AnoDDPM)",
)
