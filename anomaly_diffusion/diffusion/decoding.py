"""The decodings x_L -> x_healthy, by name: plain DDIM (Wolleb 2022) or THOR's harmonised DDIM (Bercea 2024).

Every decoder has one signature, so explain, evaluate's `dec=` key and the config's
`explain.decoding` take any registered name:

    decoder(eps_fn, x_L, x_0, schedule, grid, harmonisation) -> x0_hat        all (B, C, *spatial)

x_0 is the input that was encoded (THOR needs it; plain DDIM ignores it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from anomaly_diffusion.diffusion.harmonise import Harmonisation, harmonised_decode, harmonised_levels
from anomaly_diffusion.diffusion.sampling import DdimGrid, EpsFn, ddim_decode
from anomaly_diffusion.diffusion.schedule import NoiseSchedule
from anomaly_diffusion.registry import Registry

Decoder = Callable[[EpsFn, torch.Tensor, torch.Tensor, NoiseSchedule, DdimGrid, Harmonisation], torch.Tensor]
"""(eps_fn, x_L, x_0, schedule, grid, harmonisation) -> x0_hat, all (B, C, *spatial)."""


def _ddim(
    eps_fn: EpsFn, x_L: torch.Tensor, x_0: torch.Tensor, schedule: NoiseSchedule, grid: DdimGrid, h: Harmonisation
) -> torch.Tensor:
    return ddim_decode(eps_fn, x_L, schedule, grid)


def _thor(
    eps_fn: EpsFn, x_L: torch.Tensor, x_0: torch.Tensor, schedule: NoiseSchedule, grid: DdimGrid, h: Harmonisation
) -> torch.Tensor:
    return harmonised_decode(eps_fn, x_L, x_0, schedule, grid, harmonised_levels(grid, h.levels), h)


DECODINGS: Registry[Decoder] = Registry("decoding")
DECODINGS.register("ddim", _ddim, "deterministic DDIM from x_L (the paper)")
DECODINGS.register(
    "thor",
    _thor,
    "DDIM harmonised with the input (THOR, Bercea 2024): at a few levels, pixels the current map calls "
    "healthy are reset to the input noised to that level",
)
