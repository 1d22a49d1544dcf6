"""The per-slice review images of an explained scan: which slices, and their input, counterfactual and
map views (the montage's rows are drawn from the same views)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anomaly_diffusion.plots import SliceViews, slice_views
from anomaly_diffusion.scans import InputPlanes

REVIEW_SLICES = 200
"""Default cap on the slices logged for review: every explained slice of a brain MRI (BraTS: 130-145)."""


@dataclass(frozen=True)
class StudyReview:
    """The per-slice review images of one study, for its MLflow run.

    Attributes:
        images: (slice number in the input, (input, counterfactual, map overlay)) per logged slice: the
            grey views as (H, W) uint8, the overlay (H, W, 3).
        explained: how many slices were explained; cap: the most that are logged; montage: its file name.
    """

    images: list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]
    explained: int
    cap: int
    montage: str


def study_review(planes: InputPlanes, vmax: float, cap: int, montage: str) -> StudyReview:
    """The review images of the slices `review_selection` picks, on the map's colour scale 0..vmax."""
    chosen = review_selection(planes.kept, cap)
    return StudyReview(
        images=[(int(planes.numbers[k]), _review_images(planes, int(k), vmax)) for k in chosen],
        explained=len(planes.kept),
        cap=cap,
        montage=montage,
    )


def review_selection(kept: np.ndarray, cap: int) -> np.ndarray:
    """The explained slices to log for review: all of `kept`, every k-th (k = ceil(n / cap)) when there
    are more than `cap`, none for cap 0."""
    if cap <= 0:
        return kept[:0]
    return kept[:: max(1, -(-kept.size // cap))]


def _review_images(planes: InputPlanes, k: int, vmax: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slice k's review images: the grey views as one channel (a third of the bytes to encode and store)."""
    shown = slice_views_of(planes, k, vmax)
    return shown.input[..., 0], shown.healthy[..., 0], shown.overlay


def slice_views_of(planes: InputPlanes, k: int, vmax: float) -> SliceViews:
    """Canonical slice k of `planes` as the three review images."""
    truth = planes.truth[..., k] if planes.truth is not None else None
    return slice_views(planes.image[..., k], planes.healthy[..., k], planes.anomaly_map[..., k], vmax, truth)
