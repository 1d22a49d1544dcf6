"""Where guidance may act: smoothing on the image grid, and the classifier's soft lesion mask.

Two remedies for a counterfactual that does not look healthy (issue 26):

- **No lattice.** A multiple-instance classifier scores regions on a coarse grid (8 x 8 regions of
  a 64 px slice for brats64: a period of 8 px); the input gradient of its region logits flows back
  through strided convolutions and carries power at that period, which region guidance paints into
  the counterfactual as a lattice of blobs. `smoothed_grad_fn` low-passes the gradient with a
  Gaussian of std sigma pixels before it enters eps_hat: its gain at period P is
  exp(-2 pi^2 sigma^2 / P^2), 0.04 at sigma = 0.4 P, while the lesion-sized components pass.
- **Masked lockstep decoding** (Dif-fuse, Fontanella et al., IEEE TMI 2024): a soft mask M from the
  classifier at t = 0 says where the lesion may be; the guided decoding is merged with the plain
  reconstruction through M at every step (`sampling.masked_ddim_decode`), so healthy tissue is the
  reconstruction's and only the masked region is repainted towards healthy. `region_mask` makes M
  from the `lse` head's region probabilities sigmoid(a_p): mapped to the image grid (bilinear),
  thresholded, dilated, smoothed, and gated by the slice's p(pathological | x_0).

Pure functions of tensors: shapes (B, C, *spatial), no networks, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anomaly_diffusion.errors import ConfigError


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """A normalised 1D Gaussian of std `sigma` pixels, radius ceil(3 sigma): (2r + 1,) float32."""
    radius = max(math.ceil(3 * sigma), 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over every spatial axis of x (B, C, *spatial), std `sigma` pixels.

    Borders are replicated (a gradient or a mask keeps its value at the image edge). sigma = 0
    returns x unchanged. Same shape and dtype as x.
    """
    if sigma <= 0:
        return x
    kernel = gaussian_kernel1d(sigma).to(device=x.device, dtype=x.dtype)
    radius = (kernel.numel() - 1) // 2
    batch, channels, *spatial = x.shape
    out = x.reshape(batch * channels, 1, *spatial)
    dims = len(spatial)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    for axis in range(dims):
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = kernel.numel()
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = radius  # F.pad counts from the last axis
        out = conv(F.pad(out, pad, mode="replicate"), kernel.reshape(shape))
    return out.reshape(x.shape)


@dataclass(frozen=True)
class MaskSettings:
    """How `region_mask` makes the soft mask of masked decoding.

    Attributes:
        threshold: a region is in the mask where its upsampled p(abnormal) = sigmoid(a_p) exceeds it.
        dilation: the hard mask is grown by this many pixels (max-pool), so the lesion's rim is
            repainted too (Dif-fuse dilates its saliency mask for the same reason).
        sigma: the grown mask is blurred with a Gaussian of this std in pixels (a soft edge: no seam
            where guided and plain decodings meet).
    """

    threshold: float = 0.5
    dilation: int = 2
    sigma: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 1:
            raise ConfigError(f"mask threshold must be in [0, 1), got {self.threshold}")
        if self.dilation < 0:
            raise ConfigError(f"mask dilation must be >= 0 pixels, got {self.dilation}")
        if self.sigma < 0:
            raise ConfigError(f"mask sigma must be >= 0 pixels, got {self.sigma}")


def regions_to_image(region_prob: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Region values (B, P), P = g^d positions of a square (cubic) grid, onto the image grid: (B, 1, *spatial).

    Bilinear (trilinear) interpolation with align_corners=False: each region's value sits at its
    cell's centre, as the strided encoder's receptive fields do.
    """
    dims = len(spatial)
    side = round(region_prob.shape[1] ** (1 / dims))
    if side**dims != region_prob.shape[1]:
        raise ValueError(f"{region_prob.shape[1]} regions are not a {dims}D square grid")
    grid = region_prob.reshape(region_prob.shape[0], 1, *([side] * dims))
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[dims]
    return F.interpolate(grid.float(), size=spatial, mode=mode, align_corners=False)


def region_mask(
    region_prob: torch.Tensor, p_pathological: torch.Tensor, spatial: tuple[int, ...], settings: MaskSettings
) -> torch.Tensor:
    """The soft guidance mask M in [0, 1], (B, 1, *spatial), of masked decoding.

    1. u = regions_to_image(sigmoid(a_p))                  p(region abnormal) on the image grid
    2. h = 1[u > threshold], grown by `dilation` pixels     (max-pool of size 2 dilation + 1)
    3. M = gaussian_blur(h, sigma) * p(pathological | x_0)  soft edge, gated by the slice classifier

    Args:
        region_prob: sigmoid(a_p) of the `lse` head at t = 0, (B, P).
        p_pathological: the slice's p(pathological | x_0, t = 0), (B,).
        spatial: the image's spatial shape.
        settings: threshold, dilation, sigma.
    """
    up = regions_to_image(region_prob, spatial)
    hard = (up > settings.threshold).float()
    if settings.dilation > 0:
        size = 2 * settings.dilation + 1
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(spatial)]
        hard = pool(hard, size, stride=1, padding=settings.dilation)
    soft = gaussian_blur(hard, settings.sigma)
    gate = p_pathological.float().reshape(-1, *([1] * (soft.dim() - 1)))
    return (soft * gate).clamp(0, 1)


def band_power_ratio(change: torch.Tensor, period: int) -> float:
    """Spectral power of a (B, C, H, W) change at spatial period `period` px over its neighbouring frequencies.

    The 2D power spectrum summed over the batch and channels; the lattice band is every frequency
    (fy, fx) with max(|fy|, |fx|) = H / period (the grid's fundamental along either axis, its
    diagonals included); the reference is the two rings of the same shape just inside and outside
    it. A ratio well above 1 means the change carries a lattice at that period.
    """
    h, w = change.shape[-2:]
    if h != w or h % period:
        raise ValueError(f"band_power_ratio needs square images divisible by the period, got {h}x{w}, {period}")
    power = torch.fft.fft2(change.double()).abs().pow(2).sum(dim=tuple(range(change.dim() - 2)))
    freq = torch.fft.fftfreq(h, d=1 / h).abs()
    ring = torch.maximum(freq[:, None], freq[None, :]).round().long()
    k = h // period
    band = power[ring == k].mean()
    neighbours = torch.cat([power[ring == k - 1], power[ring == k + 1]]).mean()
    return float(band / neighbours)
