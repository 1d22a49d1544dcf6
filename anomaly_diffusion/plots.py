"""Images for people: per-slice views and the explain montage (input | counterfactual | map over input), curves."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
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


GREY_WINDOW = (-1.0, 2.0)
"""Normalised intensities shown black to white (foreground percentiles at -1 and 1; headroom for bright lesions)."""
MAP_FLOOR = 0.1
"""Map values below this fraction of the colour scale's top are not painted over the scan."""
MAP_ALPHA = 0.7
OUTLINE_RGB = (0, 255, 255)
_HOT = (matplotlib.colormaps["hot"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class SliceViews:
    """One slice as people look at it, each (H, W, 3) uint8 RGB at the input's resolution.

    Displayed as the montages always were: the plane's first canonical axis runs left to right,
    its second bottom to top (for an axial slice: the subject's right on the right, anterior up).

    Attributes:
        input: the scan, grey.
        healthy: its healthy counterfactual, same window.
        overlay: the anomaly map (`hot`, 0 to the scale's top) over the scan, with the lesion
            mask's outline in cyan when a mask is given.
    """

    input: np.ndarray
    healthy: np.ndarray
    overlay: np.ndarray


def _display(plane: np.ndarray) -> np.ndarray:
    """(A, B) canonical plane -> (B, A) image rows top to bottom (as imshow(plane.T, origin='lower'))."""
    return plane.T[::-1]


def _grey(plane: np.ndarray) -> np.ndarray:
    low, high = GREY_WINDOW
    level = np.clip((plane - low) / (high - low) * 255, 0, 255).round().astype(np.uint8)
    return np.repeat(level[..., None], 3, axis=-1)


def outline(mask: np.ndarray) -> np.ndarray:
    """The inner boundary of a 2D mask: its pixels with a 4-neighbour outside it (the image edge counts as outside)."""
    inside = np.pad(mask.astype(bool), 1, constant_values=False)
    interior = inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    return mask.astype(bool) & ~interior


def slice_views(
    image: np.ndarray,
    healthy: np.ndarray,
    anomaly_map: np.ndarray,
    vmax: float,
    truth: np.ndarray | None = None,
) -> SliceViews:
    """Render one (A, B) plane of `scans.InputPlanes` as three RGB images, pixel for voxel.

    Args:
        image, healthy: normalised intensities, shown in `GREY_WINDOW`.
        anomaly_map: scores >= 0; painted with `hot` on [0, vmax] at `MAP_ALPHA` where >= MAP_FLOOR * vmax.
        vmax: the colour scale's top (the same for every slice of a scan, so slices compare).
        truth: optional bool lesion mask, drawn as its one-pixel outline.
    """
    base = _grey(_display(image))
    scores = _display(anomaly_map)
    top = max(float(vmax), 1e-12)
    overlay = base.copy()
    painted = scores >= MAP_FLOOR * top
    colour = _HOT[np.clip(scores / top * 255, 0, 255).astype(np.uint8)]
    overlay[painted] = (MAP_ALPHA * colour[painted] + (1 - MAP_ALPHA) * base[painted]).round().astype(np.uint8)
    if truth is not None:
        overlay[outline(_display(truth))] = OUTLINE_RGB
    return SliceViews(input=base, healthy=_grey(_display(healthy)), overlay=overlay)


MONTAGE_MIN_PANEL = 160
"""Inputs smaller than this (pixels) are enlarged by a whole factor in the montage, each voxel a block."""


def explain_montage(rows: Sequence[tuple[int, SliceViews]], vmax: float, path: Path) -> Path:
    """One row per slice: input | healthy counterfactual | map over the input, pixel for voxel.

    Args:
        rows: (the input's slice number, its views), top to bottom; all views of one shape.
        vmax: the map's colour scale top (for the column title).
        path: PNG file to write.
    """
    height, width = rows[0][1].input.shape[:2] if rows else (MONTAGE_MIN_PANEL, MONTAGE_MIN_PANEL)
    zoom = max(1, -(-MONTAGE_MIN_PANEL // max(height, width)))
    h, w = height * zoom, width * zoom
    dpi, gap, title = 100, 8, 22
    fig_w, row_h = 3 * w + 4 * gap, h + title
    fig_h = max(len(rows), 1) * row_h + gap
    figure = plt.figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    for r, (number, views) in enumerate(rows):
        top = fig_h - r * row_h - title
        panels = (
            (views.input, f"slice {number}: input"),
            (views.healthy, "healthy counterfactual"),
            (views.overlay, f"anomaly map (0 to {vmax:.3g})"),
        )
        for c, (rgb, name) in enumerate(panels):
            left = gap + c * (w + gap)
            axis = figure.add_axes((left / fig_w, (top - h) / fig_h, w / fig_w, h / fig_h))
            axis.imshow(np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1), interpolation="none")
            axis.set_axis_off()
            figure.text((left + w / 2) / fig_w, (top + 4) / fig_h, name, ha="center", va="bottom", fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
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
