"""Batch augmentations for the classifier: they hide where in the head a slice comes from.

With few subjects the tumour-free slices are the top and bottom of the head, so a slice label
also encodes the slice's level, which the brain's outline (its size and position) gives away.
Random zoom and shift of each slice blur that shortcut while keeping the image-level label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_zoom_shift(x: torch.Tensor, jitter: float, generator: torch.Generator) -> torch.Tensor:
    """Zoom each slice by a factor in [1 - jitter, 1 + jitter] and shift it by up to jitter/2 of its width.

    Bilinear resampling with border padding (the border of a head slice is background).

    Args:
        x: (B, C, H, W) slices.
        jitter: 0 <= jitter < 1; 0 returns x unchanged.
        generator: CPU random source (the parameters are drawn on the CPU).

    Returns:
        (B, C, H, W) augmented slices, on x's device and dtype.
    """
    if jitter == 0:
        return x
    b = x.shape[0]
    zoom = 1 + jitter * (2 * torch.rand(b, generator=generator) - 1)
    shift = jitter * (torch.rand(b, 2, generator=generator) - 0.5)  # in [-jitter/2, jitter/2] of the half-width 1
    theta = torch.zeros(b, 2, 3)
    # affine_grid maps output coordinates to input ones: 1/zoom magnifies by zoom
    theta[:, 0, 0] = 1 / zoom
    theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = shift * 2
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
