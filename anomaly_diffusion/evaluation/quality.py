"""How healthy a counterfactual looks, beside how well its map detects (issue 26).

A good counterfactual changes healthy tissue little and removes the lesion. Per volume, at model
resolution, in normalised units, on the brain pixels of the kept slices:

- healthy-tissue change: mean_c |x - x_healthy| averaged over the brain pixels of lesion-free slices
  (`change_clean`), and over the brain pixels outside the lesion dilated by `DILATION` pixels on
  diseased slices (`change_diseased`);
- lesion removal: in the channel c* where the lesion is most hyperintense against the ring around it
  (the lesion dilated by `DILATION`, minus the lesion, inside the brain), the share of that contrast
  the counterfactual takes away: 1 - C_after / C_before with C = mean_lesion(x_c*) - mean_ring(x_c*),
  pooled over the volume's diseased slices (1: the lesion is gone, 0: unchanged, < 0: brighter);
- p(healthy | x_healthy, t=0) on the diseased slices, where a classifier exists;
- lattice: the change's power at the classifier's region-grid period over its neighbouring
  frequencies (`masking.band_power_ratio`) on the diseased slices; ~1 means no lattice.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import binary_dilation

from anomaly_diffusion.diffusion.masking import band_power_ratio

DILATION = 3
"""Pixels (model resolution) the lesion is grown by: its rim is neither lesion nor healthy tissue."""

QUALITY_METRICS = ("change_clean", "change_diseased", "lesion_removal", "p_healthy_diseased", "lattice")
"""The per-volume counterfactual-quality values, in `counterfactual_quality`'s order."""


def counterfactual_quality(
    x: torch.Tensor,
    x_healthy: torch.Tensor,
    lesion: torch.Tensor,
    brain: torch.Tensor,
    p_healthy_after: torch.Tensor,
    period: int | None = None,
) -> dict[str, float]:
    """The quality values of one volume's counterfactuals (see the module docstring); NaN where undefined.

    Args:
        x: the slices, (N, C, S, S), normalised units.
        x_healthy: their counterfactuals, same shape.
        lesion: (N, S, S) bool, lesion pixels at model resolution.
        brain: (N, S, S) bool, brain (foreground) pixels at model resolution.
        p_healthy_after: (N,) p(healthy | x_healthy, t=0) (NaN without a classifier).
        period: the classifier's region-grid period in pixels (None: no lattice value).
    """
    change = (x - x_healthy).abs().mean(dim=1).numpy()
    lesion_np, brain_np = lesion.numpy().astype(bool), brain.numpy().astype(bool)
    diseased: np.ndarray = np.asarray(lesion_np.any(axis=(1, 2)))
    square = np.ones((3, 3), dtype=bool)  # chessboard distance: a square grows by DILATION on every side
    grown = np.stack([binary_dilation(m, square, iterations=DILATION) if m.any() else m for m in lesion_np])
    clean_pixels = brain_np & ~diseased[:, None, None]
    outside = brain_np & ~grown & diseased[:, None, None]
    ring = brain_np & grown & ~lesion_np
    values = {
        "change_clean": _mean(change[clean_pixels]),
        "change_diseased": _mean(change[outside]),
        "lesion_removal": float("nan"),
        "p_healthy_diseased": _mean(p_healthy_after.numpy()[diseased]),
        "lattice": float("nan"),
    }
    if lesion_np.any() and ring.any():
        xs, hs = x.numpy(), x_healthy.numpy()
        before = np.array([xs[:, c][lesion_np].mean() - xs[:, c][ring].mean() for c in range(xs.shape[1])])
        c = int(np.argmax(before))
        if before[c] > 0:
            after = hs[:, c][lesion_np].mean() - hs[:, c][ring].mean()
            values["lesion_removal"] = float(1 - after / before[c])
    size = x.shape[-1]
    if period and diseased.any() and x.shape[-2] == size and size % period == 0 and size // period >= 2:
        values["lattice"] = band_power_ratio((x_healthy - x)[torch.from_numpy(diseased)], period)
    return values


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")
