"""Noise for the stochastic encodings x_L = sqrt(alpha_bar_L) x_0 + sqrt(1 - alpha_bar_L) eps (Ho 2020, eq. 4).

White Gaussian eps (the DDPM's own) destroys fine detail first and leaves the coarse shape of a
lesion for the decoder to copy back. Spatially correlated noise hides large structures as well,
so the decoder has to repaint them from what it learnt of healthy anatomy:

- `coarse_noise`: Gaussian noise drawn on a grid `cell` times coarser than the image and upsampled
  (bi/trilinearly), scaled to unit variance at every pixel (Kascenas et al. 2023, "The role of
  noise in denoising models for anomaly detection in medical images");
- `simplex_noise`: multi-octave 2D simplex noise (Perlin 2001, Gustavson 2005), standardised per
  image (Wyatt et al. 2022, AnoDDPM).

Both are pure functions of a shape and a `torch.Generator`; shapes are (B, C, *spatial) and each
(b, c) image is an independent draw. The model itself was trained with white noise, so these
change the encoding only, as in the papers that use them at inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _interpolation_matrix(low: int, size: int) -> torch.Tensor:
    """(size, low) A with A z = 1D linear upsampling of z (torch's, align_corners=False)."""
    eye = torch.eye(low, dtype=torch.float64)[None]  # (1, C=low, L=low): channel c is e_c
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[0].T


def coarse_noise(shape: tuple[int, ...], cell: int, generator: torch.Generator) -> torch.Tensor:
    """Low-frequency Gaussian noise: z ~ N(0, I) on a coarse grid, upsampled, unit variance per pixel.

    z has ceil(s_d / cell) points along each spatial axis d; u = A z with A the separable
    bi/trilinear upsampling (align_corners=False), so u_i ~ N(0, sum_j A_ij^2). Each pixel is
    divided by its own standard deviation sqrt(prod_d sum_j A_d[i_d, j]^2), computed exactly from
    the 1D interpolation matrices A_d, so eps_i ~ N(0, 1) everywhere, as q(x_t | x_0) needs.
    Neighbouring pixels within a cell are strongly correlated; cell = 1 is white noise.

    Args:
        shape: (B, C, *spatial) with 1 to 3 spatial axes.
        cell: the coarse grid's spacing in pixels (Kascenas 2023: 16x16 noise for 128x128 images, cell 8).
        generator: the random source (CPU).

    Returns:
        eps, float32, of `shape`.
    """
    spatial = shape[2:]
    if cell < 1:
        raise ValueError(f"cell must be >= 1, got {cell}")
    if not 1 <= len(spatial) <= 3:
        raise ValueError(f"coarse noise needs 1 to 3 spatial axes, got shape {shape}")
    low = tuple(math.ceil(s / cell) for s in spatial)
    z = torch.randn((*shape[:2], *low), generator=generator, dtype=torch.float64)
    u = F.interpolate(z, size=spatial, mode=_INTERPOLATION[len(spatial)], align_corners=False)
    variance = torch.ones((), dtype=torch.float64)
    for d, (n_low, size) in enumerate(zip(low, spatial, strict=True)):
        row = (_interpolation_matrix(n_low, size) ** 2).sum(dim=1)  # (size,)
        variance = variance * row.reshape(size, *([1] * (len(spatial) - 1 - d)))
    return (u / variance.sqrt()).float()


_F2 = 0.5 * (math.sqrt(3.0) - 1.0)  # skews the square grid onto the simplex (triangle) grid
_G2 = (3.0 - math.sqrt(3.0)) / 6.0  # and back
_TABLE = 256


def simplex2d(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """2D simplex noise at points (x, y) (Gustavson 2005, "Simplex noise demystified"), in about [-1, 1].

    The plane is cut into triangles; each corner k of the point's triangle, at offset (x_k, y_k),
    contributes max(0, 1/2 - x_k^2 - y_k^2)^4 <g_k, (x_k, y_k)>, with g_k the unit gradient of
    that lattice vertex; the sum is scaled by 70. The noise is 0 on the lattice vertices and
    continuous everywhere.

    Args:
        x, y: coordinates, (M, P) float64 (M independent fields, P points each).
        perm: (M, 256) long, a permutation of 0..255 per field (the vertex hash).
        angles: (M, 256) float64, gradient directions in radians.

    Returns:
        (M, P) float64.
    """
    s = (x + y) * _F2
    i, j = torch.floor(x + s), torch.floor(y + s)
    t = (i + j) * _G2
    x0, y0 = x - (i - t), y - (j - t)
    lower = (x0 > y0).to(x.dtype)  # which triangle of the cell: (1, 0) or (0, 1) is its middle corner
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    corners = (  # (offset from the corner, the corner's lattice step from (i, j))
        (x0, y0, zero, zero),
        (x0 - lower + _G2, y0 - (1 - lower) + _G2, lower, 1 - lower),
        (x0 - 1 + 2 * _G2, y0 - 1 + 2 * _G2, one, one),
    )
    ii, jj = i.long() % _TABLE, j.long() % _TABLE
    total = torch.zeros_like(x)
    for xk, yk, di, dj in corners:
        vi = (ii + di.long()) % _TABLE
        vj = (jj + dj.long()) % _TABLE
        vertex = torch.gather(perm, 1, (vi + torch.gather(perm, 1, vj)) % _TABLE)
        theta = torch.gather(angles, 1, vertex)
        falloff = (0.5 - xk**2 - yk**2).clamp(min=0)
        total = total + falloff**4 * (torch.cos(theta) * xk + torch.sin(theta) * yk)
    return 70.0 * total


def simplex_noise(
    shape: tuple[int, ...],
    cell: int,
    generator: torch.Generator,
    octaves: int = 6,
    persistence: float = 0.8,
) -> torch.Tensor:
    """Multi-octave 2D simplex noise, standardised to mean 0 and variance 1 per image (AnoDDPM, Wyatt 2022).

    Octave k = 0..octaves-1 has lattice spacing cell / 2^k pixels and amplitude persistence^k
    (fractal Brownian motion); every (b, c) image has its own vertex hash, gradients and offset.

    Args:
        shape: (B, C, H, W): simplex noise is made for 2D slices only.
        cell: the coarsest octave's lattice spacing in pixels.
        generator: the random source (CPU).
        octaves, persistence: the octave count and the amplitude ratio between octaves (AnoDDPM: 6, 0.8).

    Returns:
        eps, float32, of `shape`.
    """
    if len(shape) != 4:
        raise ValueError(f"simplex noise is 2D: it needs (B, C, H, W) slices, got shape {shape}")
    if cell < 1 or octaves < 1 or not 0 < persistence <= 1:
        raise ValueError(f"need cell >= 1, octaves >= 1, 0 < persistence <= 1; got {cell}, {octaves}, {persistence}")
    b, c, h, w = shape
    m = b * c
    perm = torch.argsort(torch.rand((m * octaves, _TABLE), generator=generator), dim=1)  # a permutation per field
    angles = 2 * math.pi * torch.rand((m * octaves, _TABLE), generator=generator, dtype=torch.float64)
    offsets = _TABLE * torch.rand((m * octaves, 2, 1), generator=generator, dtype=torch.float64)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij"
    )
    frequency = (2.0 ** torch.arange(octaves, dtype=torch.float64) / cell).repeat(m)[:, None]  # (m * octaves, 1)
    x = cols.reshape(1, -1) * frequency + offsets[:, 0]
    y = rows.reshape(1, -1) * frequency + offsets[:, 1]
    fields = simplex2d(x, y, perm, angles).reshape(m, octaves, h * w)
    amplitude = persistence ** torch.arange(octaves, dtype=torch.float64)
    noise = (fields * amplitude[None, :, None]).sum(dim=1)  # (m, P)
    noise = (noise - noise.mean(dim=1, keepdim=True)) / noise.std(dim=1, unbiased=False, keepdim=True).clamp(min=1e-12)
    return noise.reshape(shape).float()
