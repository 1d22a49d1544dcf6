"""PNG figures for people: the explain montage (input | counterfactual | map over input)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from anomaly_diffusion.data.io import atomic_write_bytes


def _show(axis: plt.Axes, image: np.ndarray, **kwargs: Any) -> None:
    # slices are (R->, A->) after canonical reorientation: transpose so anterior is up
    axis.imshow(image.T, origin="lower", **kwargs)
    axis.set_axis_off()


def explain_montage(
    x: torch.Tensor,
    x_healthy: torch.Tensor,
    anomaly_map: torch.Tensor,
    slice_numbers: list[int],
    rows: list[int],
    path: Path,
    truth: torch.Tensor | None = None,
) -> Path:
    """One row per chosen slice: input | healthy counterfactual | anomaly map over the input.

    Args:
        x, x_healthy: (N, C, S, S) model-resolution slices (channel 0 is shown).
        anomaly_map: (N, S, S).
        slice_numbers: the input's slice index of each of the N slices (for titles).
        rows: which of the N slices to show.
        path: PNG file to write.
        truth: optional (N, S, S) lesion masks, drawn as a contour on the map.
    """
    vmax = float(anomaly_map[rows].max()) if rows else 1.0
    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for r, i in enumerate(rows):
        base = x[i, 0].numpy()
        _show(axes[r, 0], base, cmap="gray", vmin=-1, vmax=2)
        _show(axes[r, 1], x_healthy[i, 0].numpy(), cmap="gray", vmin=-1, vmax=2)
        _show(axes[r, 2], base, cmap="gray", vmin=-1, vmax=2)
        overlay = np.ma.masked_less(anomaly_map[i].numpy(), 0.1 * vmax)
        _show(axes[r, 2], overlay, cmap="hot", vmin=0, vmax=max(vmax, 1e-6), alpha=0.7)
        if truth is not None and truth[i].any():
            axes[r, 2].contour(truth[i].numpy().T.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        axes[r, 0].set_title(f"slice {slice_numbers[i]}: input", fontsize=9)
        axes[r, 1].set_title("healthy counterfactual", fontsize=9)
        axes[r, 2].set_title("anomaly map", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return atomic_write_bytes(buffer.getvalue(), path)


def training_snapshot(
    samples: torch.Tensor, inputs: torch.Tensor, reconstructions: torch.Tensor, title: str, path: Path
) -> Path:
    """Row 1: unconditional DDIM samples; rows 2-3: validation slices and their encode/decode reconstructions.

    All tensors are (N, C, S, S) in normalised units; channel 0 is shown.
    """
    columns = max(samples.shape[0], inputs.shape[0], 1)
    figure, axes = plt.subplots(3, columns, figsize=(1.6 * columns, 5.2), squeeze=False)
    rows = (("samples", samples), ("validation", inputs), ("reconstruction", reconstructions))
    for r, (name, images) in enumerate(rows):
        for c in range(columns):
            axes[r, c].set_axis_off()
            if c < images.shape[0]:
                _show(axes[r, c], images[c, 0].float().numpy(), cmap="gray", vmin=-1, vmax=2)
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return atomic_write_bytes(buffer.getvalue(), path)
