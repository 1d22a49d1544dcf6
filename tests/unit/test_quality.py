"""Counterfactual quality (healthy-tissue change, lesion removal, p(healthy), lattice) on cases with exact answers."""

from __future__ import annotations

import math

import pytest
import torch

from anomaly_diffusion.evaluation.quality import QUALITY_METRICS, counterfactual_quality


def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 16 px slices of 2 channels: slice 0 lesion-free, slice 1 with a 4x4 lesion, +2 in channel 1 only."""
    x = torch.zeros(2, 2, 16, 16)
    lesion = torch.zeros(2, 16, 16, dtype=torch.bool)
    lesion[1, 6:10, 6:10] = True
    x[1, 1][lesion[1]] = 2.0
    brain = torch.ones(2, 16, 16, dtype=torch.bool)
    return x, lesion, brain


def test_a_perfect_counterfactual_removes_the_lesion_and_changes_nothing_else() -> None:
    x, lesion, brain = _case()
    healthy = x.clone()
    healthy[1, 1][lesion[1]] = 0.0
    q = counterfactual_quality(x, healthy, lesion, brain, torch.tensor([0.9, 0.8]))
    assert set(q) == set(QUALITY_METRICS)
    assert q["change_clean"] == 0.0 and q["change_diseased"] == 0.0
    assert q["lesion_removal"] == pytest.approx(1.0)
    assert q["p_healthy_diseased"] == pytest.approx(0.8) and math.isnan(q["lattice"])  # no period given


def test_change_everywhere_and_a_lesion_only_dimmed() -> None:
    x, lesion, brain = _case()
    healthy = x + 0.5  # every pixel of both channels brighter by 0.5: the contrast is kept
    q = counterfactual_quality(x, healthy, lesion, brain, torch.full((2,), float("nan")))
    assert q["change_clean"] == pytest.approx(0.5) and q["change_diseased"] == pytest.approx(0.5)
    assert q["lesion_removal"] == pytest.approx(0.0)
    dimmed = x.clone()
    dimmed[1, 1][lesion[1]] = 0.5  # the contrast of 2 against the ring becomes 0.5: 75% removed
    assert counterfactual_quality(x, dimmed, lesion, brain, torch.zeros(2))["lesion_removal"] == pytest.approx(0.75)
    # outside the brain nothing counts; the rim (3 px around the lesion) is not healthy tissue
    rim = x.clone()
    rim[1, :, 4:12, 4:12] += 1.0
    rim[1, 1][lesion[1]] = 2.0
    assert counterfactual_quality(x, rim, lesion, brain, torch.zeros(2))["change_diseased"] == 0.0


def test_the_lattice_value_sees_a_change_at_the_grid_period() -> None:
    x, lesion, brain = _case()
    y, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    lattice = torch.cos(2 * torch.pi * xx / 4) * torch.cos(2 * torch.pi * y / 4)
    q = counterfactual_quality(x, x + lattice, lesion, brain, torch.zeros(2), period=4)
    smooth = counterfactual_quality(x, x + 0.1 * y / 16, lesion, brain, torch.zeros(2), period=4)
    assert q["lattice"] > 50 and smooth["lattice"] < 2
