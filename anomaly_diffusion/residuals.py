"""How the anomaly map is made from a scan and its healthy counterfactual (the `RESIDUALS` registry).

Each residual maps x and x_healthy, (N, C, *spatial) each, to a map (N, *spatial) summed over
channels. Config validation, the CLI's `--residual` choices and evaluate's `r=` key come from
the registry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from anomaly_diffusion.registry import Registry

ResidualFn = Callable[[torch.Tensor], torch.Tensor]
"""d = x - x_healthy, (N, C, *spatial) -> the map's per-channel values, same shape."""

RESIDUALS: Registry[ResidualFn] = Registry("residual")
RESIDUALS.register("abs", lambda d: d.abs(), "|x - x_healthy|, the paper")
RESIDUALS.register(
    "positive",
    lambda d: d.clamp(min=0),
    "only where the scan is brighter than healthy (hyperintense lesions: FLAIR, T2)",
)
RESIDUALS.register("negative", lambda d: (-d).clamp(min=0), "only where the scan is darker than healthy")


def residual_map(
    x: torch.Tensor, x_healthy: torch.Tensor, residual: str = "abs", channel: int | None = None
) -> torch.Tensor:
    """The anomaly map of inputs x and counterfactuals x_healthy, (N, C, S, S) each -> (N, S, S).

    x may also be the plain reconstruction of the same x_L (the paired residual: the error that
    both decodings share cancels). `channel` keeps that channel alone instead of the sum over channels.

    - abs: sum_c |x_c - x_healthy_c| (Wolleb 2022);
    - positive: sum_c max(x_c - x_healthy_c, 0): only voxels the counterfactual made darker, i.e. where
      the scan is brighter than healthy (lesions hyperintense in FLAIR or T2). A prior on the lesion's
      contrast, not a label: the supervision regime is unchanged;
    - negative: sum_c max(x_healthy_c - x_c, 0), for hypointense lesions.
    """
    values = RESIDUALS.get(residual).function(x - x_healthy)
    return values.sum(dim=1) if channel is None else values[:, channel]
