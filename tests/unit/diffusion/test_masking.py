"""Smoothing on the image grid (no lattice), the soft lesion mask and masked lockstep decoding, on exact answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomaly_diffusion.config import load_config
from anomaly_diffusion.diffusion.guidance import guided_eps_fn, region_grad_fn, smoothed_grad_fn
from anomaly_diffusion.diffusion.masking import (
    MaskSettings,
    band_power_ratio,
    gaussian_blur,
    gaussian_kernel1d,
    region_mask,
    regions_to_image,
)
from anomaly_diffusion.diffusion.sampling import ddim_decode, ddim_grid, masked_ddim_decode
from anomaly_diffusion.diffusion.schedule import make_schedule
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.models.networks import build_classifier

BRATS64 = Path(__file__).parents[3] / "configs" / "brats64.yaml"


def test_gaussian_blur_keeps_constants_and_mass_and_spreads_a_point_as_the_kernel() -> None:
    kernel = gaussian_kernel1d(1.5)
    assert kernel.numel() == 11 and torch.isclose(kernel.sum(), torch.tensor(1.0))
    constant = torch.full((2, 3, 12, 12), 0.7)
    assert torch.allclose(gaussian_blur(constant, 1.5), constant)
    point = torch.zeros(1, 1, 21, 21)
    point[0, 0, 10, 10] = 1.0
    expected = torch.zeros(21, 21)
    expected[5:16, 5:16] = torch.outer(kernel, kernel)  # separable: the 2D kernel is the outer product
    assert torch.allclose(gaussian_blur(point, 1.5)[0, 0], expected, atol=1e-7)
    assert torch.equal(gaussian_blur(point, 0), point)


def test_band_power_ratio_finds_a_lattice_at_its_period_only() -> None:
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    lattice = torch.cos(2 * torch.pi * x / 8) * torch.cos(2 * torch.pi * y / 8)
    noise = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    assert band_power_ratio((lattice + 0.1 * noise)[None, None], 8) > 50
    assert band_power_ratio(noise[None, None], 8) < 2
    with pytest.raises(ValueError, match="divisible"):
        band_power_ratio(noise[None, None, :60, :60], 8)


def _brats64_classifier() -> tuple[torch.nn.Module, float]:
    cfg = load_config(BRATS64)
    torch.manual_seed(0)
    classifier = build_classifier(cfg.classifier, 1).eval().requires_grad_(False)
    return classifier, cfg.explain.smooth


def test_region_guidance_imprints_the_classifier_grid_unless_smoothed_as_shipped() -> None:
    """The lattice: brats64's lse classifier scores 8 x 8 regions of a 64 px slice (period 8 px); the input
    gradient of its regions carries power there. The shipped config's smoothing removes it."""
    classifier, shipped_sigma = _brats64_classifier()
    x_t = 0.5 * torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), 50)
    grad = region_grad_fn(classifier.region_logits)
    assert band_power_ratio(grad(x_t, t), 8) > 5  # today's region guidance: a lattice at the grid period
    assert shipped_sigma > 0
    smoothed = smoothed_grad_fn(grad, shipped_sigma)(x_t, t)
    assert band_power_ratio(smoothed, 8) < 2
    assert torch.allclose(smoothed, gaussian_blur(grad(x_t, t), shipped_sigma))  # the same push, low-passed
    assert smoothed_grad_fn(grad, 0) is grad


def test_region_mask_upsamples_thresholds_dilates_blurs_and_gates() -> None:
    regions = torch.zeros(2, 16)  # a 4 x 4 grid of a 16 px image: cells of 4 px
    regions[:, 5] = 1.0  # cell (1, 1): pixels 4..7
    up = regions_to_image(regions, (16, 16))
    # the cell's centre (5.5, 5.5) lies between pixels 5 and 6: each is half a pixel from it, of 4 px cells
    assert up.shape == (2, 1, 16, 16) and torch.allclose(up[0, 0, 5:7, 5:7], torch.full((2, 2), (7 / 8) ** 2))
    hard = MaskSettings(threshold=0.5, dilation=0, sigma=0)
    gate = torch.tensor([1.0, 0.25])
    mask = region_mask(regions, gate, (16, 16), hard)
    expected = (up[0, 0] > 0.5).float()
    assert torch.equal(mask[0, 0], expected) and torch.equal(mask[1, 0], 0.25 * expected)
    grown = region_mask(regions, gate, (16, 16), MaskSettings(0.5, dilation=2, sigma=0))[0, 0]
    rows = torch.nonzero(expected.any(dim=1)).flatten()
    assert int(grown.any(dim=1).sum()) == len(rows) + 4  # two pixels more on each side
    soft = region_mask(regions, gate, (16, 16), MaskSettings(0.5, dilation=2, sigma=1.5))[0, 0]
    assert float(soft.min()) >= 0 and float(soft.max()) <= 1.0
    assert float(soft[0, 0]) < 0.05 and float(soft[15, 15]) < 1e-4 and float(soft[6, 6]) > 0.95
    with pytest.raises(ConfigError, match="threshold"):
        MaskSettings(threshold=1.0)
    with pytest.raises(ValueError, match="square grid"):
        regions_to_image(torch.zeros(1, 15), (16, 16))


def _oracle(variance: float, schedule_t: torch.Tensor):
    """E[eps | x_t] for data x_0 ~ N(0, variance I): sqrt(1 - ab) x_t / (ab variance + 1 - ab)."""

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule_t[t].reshape(-1, *([1] * (x_t.dim() - 1)))
        return (1 - ab).sqrt() * x_t / (ab * variance + 1 - ab)

    return eps_fn


def test_masked_lockstep_decoding_is_guided_inside_and_the_reconstruction_outside() -> None:
    schedule = make_schedule("linear", 1000)
    eps_fn = _oracle(0.5, schedule.alpha_bar)
    w = torch.zeros(1, 1, 8, 8)
    w[..., 2:5, 2:5] = 1.0  # a linear classifier: grad log p(healthy | x_t) = w everywhere

    def grad(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return w.expand_as(x_t)

    eps_hat = guided_eps_fn(eps_fn, grad, schedule, 3.0)
    grid = ddim_grid(300, 10, 1000)
    x_L = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    guided, plain = ddim_decode(eps_hat, x_L, schedule, grid), ddim_decode(eps_fn, x_L, schedule, grid)
    g, r = masked_ddim_decode(eps_hat, eps_fn, x_L, schedule, grid, torch.ones(2, 1, 8, 8))
    assert torch.allclose(g, guided, atol=1e-6) and torch.allclose(r, plain, atol=1e-6)
    g0, r0 = masked_ddim_decode(eps_hat, eps_fn, x_L, schedule, grid, torch.zeros(2, 1, 8, 8))
    assert torch.allclose(g0, plain, atol=1e-6) and torch.allclose(r0, plain, atol=1e-6)
    # a mask over the left half: the right half is exactly the reconstruction, the left is changed by guidance
    half = torch.zeros(2, 1, 8, 8)
    half[..., :4] = 1.0
    gh, _ = masked_ddim_decode(eps_hat, eps_fn, x_L, schedule, grid, half)
    assert torch.allclose(gh[..., 4:], plain[..., 4:], atol=1e-6)
    assert float((gh[..., 2:4, 2:4] - plain[..., 2:4, 2:4]).abs().min()) > 1e-3
