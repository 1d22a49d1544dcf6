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

from anomaly_diffusion.files import atomic_write_bytes


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


def _png(figure: Any, path: Path, dpi: int = 100) -> Path:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return atomic_write_bytes(buffer.getvalue(), path)


MAX_CURVE_POINTS = 2000


def _thin(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Keep at most MAX_CURVE_POINTS evenly spaced points of curves (figures only)."""
    n = len(arrays[0])
    if n <= MAX_CURVE_POINTS:
        return arrays
    keep = np.unique(np.linspace(0, n - 1, MAX_CURVE_POINTS).astype(int))
    return tuple(a[keep] for a in arrays)


def roc_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """ROC and precision-recall curves of several methods (voxel scores, lesion labels) side by side."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    figure, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(10, 4.4))
    for name, (scores, truth) in curves.items():
        if not truth.any() or truth.all():
            continue
        fpr, tpr, _ = roc_curve(truth, scores)
        precision, recall, _ = precision_recall_curve(truth, scores)
        roc_axis.plot(*_thin(fpr, tpr), label=name)
        pr_axis.plot(*_thin(recall, precision), label=name)
    roc_axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    roc_axis.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (brain voxels)")
    prevalence = float(np.mean(np.concatenate([t for _, t in curves.values()]))) if curves else 0.0
    pr_axis.axhline(prevalence, color="grey", linestyle=":", linewidth=0.8)
    pr_axis.set(xlabel="recall", ylabel="precision", title="precision-recall (brain voxels)", xlim=(0, 1), ylim=(0, 1))
    roc_axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    return _png(figure, path)


def dice_vs_threshold(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """Pooled Dice against the fraction of brain voxels flagged, per method.

    The x axis is the share of voxels above the threshold (the threshold's quantile), so methods
    whose scores live on different scales can be compared on one figure.
    """
    from sklearn.metrics import precision_recall_curve

    figure, axis = plt.subplots(figsize=(6, 4.2))
    for name, (scores, truth) in curves.items():
        if not truth.any():
            continue
        precision, recall, thresholds = precision_recall_curve(truth, scores)
        dice = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        ordered = np.sort(scores)
        flagged = 1 - np.searchsorted(ordered, thresholds, side="left") / len(ordered)
        axis.plot(*_thin(flagged, dice[:-1]), label=name)
    axis.set(xscale="log", xlabel="fraction of brain voxels flagged", ylabel="Dice", title=title, ylim=(0, 1))
    axis.legend(fontsize=8)
    return _png(figure, path)


def evaluation_montage(rows: list[tuple[str, Any]], path: Path) -> Path:
    """One row per example slice: input | healthy counterfactual | anomaly map | ground truth.

    Args:
        rows: (title, example) with example having (S, S) arrays x, x_healthy, anomaly_map, truth.
        path: PNG file to write.
    """
    figure, axes = plt.subplots(max(len(rows), 1), 4, figsize=(9.6, 2.5 * max(len(rows), 1)), squeeze=False)
    for r, (title, example) in enumerate(rows):
        vmax = max(float(example.anomaly_map.max()), 1e-6)
        _show(axes[r, 0], example.x, cmap="gray", vmin=-1, vmax=2)
        _show(axes[r, 1], example.x_healthy, cmap="gray", vmin=-1, vmax=2)
        _show(axes[r, 2], example.anomaly_map, cmap="hot", vmin=0, vmax=vmax)
        _show(axes[r, 3], example.x, cmap="gray", vmin=-1, vmax=2)
        _show(axes[r, 3], np.ma.masked_equal(example.truth.astype(float), 0.0), cmap="cool", vmin=0, vmax=1, alpha=0.6)
        axes[r, 0].set_title(title, fontsize=7)
        axes[r, 1].set_title("healthy counterfactual", fontsize=8)
        axes[r, 2].set_title("anomaly map", fontsize=8)
        axes[r, 3].set_title("ground truth", fontsize=8)
    for axis in axes[len(rows) :].flatten():
        axis.set_axis_off()
    return _png(figure, path)
