"""The anomaly map's residual options (`residuals.residual_map`), against hand-computed answers."""

import pytest
import torch

from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.residuals import residual_map


def test_residual_map_sums_the_chosen_part_of_the_difference_over_channels() -> None:
    # one slice, two channels, 1x2 pixels: x - x_healthy = [[+2, -1], [-3, +0.5]]
    x = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])
    x_healthy = torch.tensor([[[[0.0, 1.0]], [[3.0, 0.5]]]])
    assert torch.equal(residual_map(x, x_healthy, "abs"), torch.tensor([[[5.0, 1.5]]]))
    assert torch.equal(residual_map(x, x_healthy, "positive"), torch.tensor([[[2.0, 0.5]]]))
    assert torch.equal(residual_map(x, x_healthy, "negative"), torch.tensor([[[3.0, 1.0]]]))
    # the two signed maps partition the absolute one
    total = residual_map(x, x_healthy, "positive") + residual_map(x, x_healthy, "negative")
    assert torch.equal(total, residual_map(x, x_healthy, "abs"))


def test_unknown_residual_is_refused() -> None:
    with pytest.raises(ConfigError, match="residual must be one of"):
        residual_map(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), "both")  # type: ignore[arg-type]
