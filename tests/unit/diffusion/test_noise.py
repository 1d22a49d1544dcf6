"""Low-frequency noises of the stochastic encodings: unit variance, seeded, spatially correlated."""

from __future__ import annotations

import math

import pytest
import torch

from anomaly_diffusion.diffusion.noise import _G2, coarse_noise, simplex2d, simplex_noise


def _neighbour_correlation(noise: torch.Tensor) -> float:
    """Pearson correlation of horizontally adjacent pixels, over all images."""
    a, b = noise[..., :-1].flatten(), noise[..., 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("shape", "cell"), [((4000, 1, 12, 10), 4), ((4000, 1, 9, 9), 3), ((2000, 1, 4, 6, 5), 2)])
def test_coarse_noise_has_unit_variance_at_every_pixel(shape: tuple[int, ...], cell: int) -> None:
    noise = coarse_noise(shape, cell, _g())
    assert noise.shape == shape and noise.dtype == torch.float32
    variance = noise.var(dim=0)  # per pixel, over independent draws
    # 4000 draws: the sample variance of N(0, 1) has sd sqrt(2 / 4000) = 0.022; 5 sd over every pixel
    assert (variance - 1).abs().max() < 0.11
    assert noise.mean(dim=0).abs().max() < 5 / math.sqrt(shape[0])


def test_coarse_noise_is_reproducible_and_correlated_unlike_white_noise() -> None:
    shape = (64, 2, 32, 32)
    first, again, other = coarse_noise(shape, 8, _g(3)), coarse_noise(shape, 8, _g(3)), coarse_noise(shape, 8, _g(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert _neighbour_correlation(first) > 0.9
    assert abs(_neighbour_correlation(torch.randn(shape, generator=_g()))) < 0.05
    # cell 1 is white noise itself: no upsampling, the draw unchanged
    assert torch.allclose(
        coarse_noise(shape, 1, _g(5)), torch.randn(shape, generator=_g(5), dtype=torch.float64).float()
    )


def test_coarse_noise_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cell"):
        coarse_noise((1, 1, 8, 8), 0, _g())
    with pytest.raises(ValueError, match="spatial"):
        coarse_noise((1, 1), 2, _g())


def test_simplex_noise_is_standardised_reproducible_and_correlated() -> None:
    shape = (6, 2, 32, 32)
    noise = simplex_noise(shape, 8, _g(1))
    assert noise.shape == shape and noise.dtype == torch.float32
    per_image = noise.flatten(2)
    assert torch.allclose(per_image.mean(dim=2), torch.zeros(6, 2), atol=1e-5)
    assert torch.allclose(per_image.std(dim=2, unbiased=False), torch.ones(6, 2), atol=1e-4)
    assert torch.equal(noise, simplex_noise(shape, 8, _g(1))) and not torch.equal(noise, simplex_noise(shape, 8, _g(2)))
    # one octave of spacing 8 px is smooth; each (b, c) image is its own draw
    smooth = simplex_noise(shape, 8, _g(1), octaves=1)
    assert _neighbour_correlation(smooth) > 0.75 and _neighbour_correlation(noise) > 0.3
    assert not torch.allclose(smooth[0, 0], smooth[0, 1]) and not torch.allclose(smooth[0, 0], smooth[1, 0])


def test_simplex2d_is_zero_on_lattice_vertices_bounded_and_continuous() -> None:
    g = _g(7)
    perm = torch.argsort(torch.rand((3, 256), generator=g), dim=1)
    angles = 2 * math.pi * torch.rand((3, 256), generator=g, dtype=torch.float64)
    i = torch.randint(0, 600, (3, 200), generator=g).double()
    j = torch.randint(0, 600, (3, 200), generator=g).double()
    # a vertex (i, j) of the skewed lattice sits at (i, j) - (i + j) G2 in the plane
    at_vertices = simplex2d(i - (i + j) * _G2, j - (i + j) * _G2, perm, angles)
    assert at_vertices.abs().max() < 1e-9
    x = 40 * torch.rand((3, 20000), generator=g, dtype=torch.float64)
    y = 40 * torch.rand((3, 20000), generator=g, dtype=torch.float64)
    values = simplex2d(x, y, perm, angles)
    assert values.abs().max() <= 1.0 and values.std() > 0.1
    nudged = simplex2d(x + 1e-6, y, perm, angles)
    assert (nudged - values).abs().max() < 1e-4  # Lipschitz: the gradient of 70 sum (..)^4 <g, d> is bounded


def test_simplex_noise_is_for_2d_slices() -> None:
    with pytest.raises(ValueError, match="2D"):
        simplex_noise((1, 1, 4, 4, 4), 2, _g())
