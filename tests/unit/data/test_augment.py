import torch

from anomaly_diffusion.data.augment import random_zoom_shift


def _square(batch: int = 64) -> torch.Tensor:
    x = torch.zeros(batch, 1, 32, 32)
    x[:, :, 12:20, 12:20] = 1.0
    return x


def test_zero_jitter_is_the_identity() -> None:
    x = torch.randn(3, 2, 16, 16)
    assert random_zoom_shift(x, 0.0, torch.Generator().manual_seed(0)) is x


def test_zoom_and_shift_stay_in_their_bounds_and_are_seeded() -> None:
    x = _square()
    out = random_zoom_shift(x, 0.2, torch.Generator().manual_seed(3))
    again = random_zoom_shift(x, 0.2, torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and out.shape == x.shape
    # the 8x8 square's area scales by zoom^2 with zoom in [0.8, 1.2]
    area = out.sum(dim=(1, 2, 3))
    assert (area > 64 * 0.8**2 - 4).all() and (area < 64 * 1.2**2 + 4).all()
    assert area.std() > 1.0  # the zoom varies across the batch
    # its centre moves by at most jitter/2 of the width (3.2 pixels) plus a resampling pixel
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cy = (out[:, 0] * ys).sum(dim=(1, 2)) / area
    cx = (out[:, 0] * xs).sum(dim=(1, 2)) / area
    assert ((cy - 15.5).abs() <= 4.2).all() and ((cx - 15.5).abs() <= 4.2).all()
    assert (cy - 15.5).abs().max() > 0.5  # and it does move
