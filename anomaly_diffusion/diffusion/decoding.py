"""The decodings x_L -> x_healthy, by name: plain DDIM (Wolleb 2022), THOR's harmonised DDIM (Bercea
2024) or Dif-fuse's masked lockstep DDIM (Fontanella 2024).

Every decoder has one signature, so explain, evaluate's `dec=` key and the config's
`explain.decoding` take any registered name:

    decoder(eps_hat, x_L, schedule, grid, context) -> Decoded(x_healthy, x_plain)

`context` holds what a decoder may use besides the guided denoiser: the encoded input x_0 (THOR),
the plain denoiser eps_theta and the soft mask M (masked decoding). A decoder that also walks the
plain reconstruction returns it (`Decoded.plain`), so the paired residual needs no third decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from anomaly_diffusion.diffusion.harmonise import Harmonisation, harmonised_decode, harmonised_levels
from anomaly_diffusion.diffusion.sampling import DdimGrid, EpsFn, ddim_decode, masked_ddim_decode
from anomaly_diffusion.diffusion.schedule import NoiseSchedule
from anomaly_diffusion.registry import Registry


@dataclass(frozen=True)
class DecodeContext:
    """What a decoder may use besides eps_hat and x_L.

    Attributes:
        x_0: the slices that were encoded, (B, C, *spatial).
        eps: the plain (unguided) denoiser eps_theta(x_t, t).
        harmonisation: THOR's settings.
        mask: the soft mask M (B, 1, *spatial) of masked decoding; None for the other decoders.
    """

    x_0: torch.Tensor
    eps: EpsFn
    harmonisation: Harmonisation
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Decoded:
    """A decoder's output: the counterfactual and, if the decoder walked it too, the plain reconstruction."""

    healthy: torch.Tensor
    plain: torch.Tensor | None = None


Decoder = Callable[[EpsFn, torch.Tensor, NoiseSchedule, DdimGrid, DecodeContext], Decoded]
"""(eps_hat, x_L, schedule, grid, context) -> Decoded, tensors (B, C, *spatial)."""


def _ddim(eps_fn: EpsFn, x_L: torch.Tensor, schedule: NoiseSchedule, grid: DdimGrid, c: DecodeContext) -> Decoded:
    return Decoded(ddim_decode(eps_fn, x_L, schedule, grid))


def _thor(eps_fn: EpsFn, x_L: torch.Tensor, schedule: NoiseSchedule, grid: DdimGrid, c: DecodeContext) -> Decoded:
    h = c.harmonisation
    return Decoded(harmonised_decode(eps_fn, x_L, c.x_0, schedule, grid, harmonised_levels(grid, h.levels), h))


def _masked(eps_fn: EpsFn, x_L: torch.Tensor, schedule: NoiseSchedule, grid: DdimGrid, c: DecodeContext) -> Decoded:
    if c.mask is None:
        raise ValueError("masked decoding needs the soft mask M (DecodeContext.mask)")
    healthy, plain = masked_ddim_decode(eps_fn, c.eps, x_L, schedule, grid, c.mask)
    return Decoded(healthy, plain)


DECODINGS: Registry[Decoder] = Registry("decoding")
DECODINGS.register("ddim", _ddim, "deterministic DDIM from x_L (the paper)")
DECODINGS.register(
    "thor",
    _thor,
    "DDIM harmonised with the input (THOR, Bercea 2024): at a few levels, pixels the current map calls "
    "healthy are reset to the input noised to that level",
)
DECODINGS.register(
    "masked",
    _masked,
    "guided and plain DDIM in lockstep, merged at every step through the classifier's soft lesion mask "
    "(Dif-fuse, Fontanella 2024): healthy tissue is the reconstruction's",
)
NEEDS_MASK = ("masked",)
"""The decodings that need `DecodeContext.mask` (made from the classifier's regions)."""
