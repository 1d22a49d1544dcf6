"""3D post-processing of anomaly maps, applied identically to every method of an evaluation.

The usual steps of the unsupervised-anomaly-segmentation literature (Baur et al. 2021, "Autoencoders
for unsupervised anomaly segmentation in brain MR images: a comparative study"; Behrendt et al. 2023):

1. a 3D median filter of the map (size^3 voxels), on the input grid;
2. brain-mask erosion: scores within k voxels of the brain's edge are set to the method's lowest
   possible score (reconstructions fail at the skull boundary, not in the lesion);
3. connected components: a binary map loses its 3D components of fewer than N voxels.

Steps 1-2 change the continuous map, so every metric sees them; step 3 acts on binary maps only
(Dice at a chosen threshold, at an FPR threshold, at per-slice Otsu thresholds, and the best Dice
over candidate thresholds), so AUROC and AUPRC do not change with it. Voxel counts are on the
input's grid (anisotropic spacing is not resampled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.evaluation.methods import MAX_MEDIAN_FILTER

MAX_EROSION = 20
CANDIDATE_THRESHOLDS = 24
"""Thresholds tried when connected components are dropped (no closed form for the best Dice then)."""


@dataclass(frozen=True)
class PostProcess:
    """The 3D post-processing of every map (see the module docstring).

    Attributes:
        median_3d: size of a cubic median filter in voxels (0 or 1: none).
        erode: voxels the brain (foreground) mask is eroded by, 6-connected steps (0: none).
        min_component: binary maps drop 26-connected components of fewer voxels (0: none).
    """

    median_3d: int = 0
    erode: int = 0
    min_component: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.median_3d <= MAX_MEDIAN_FILTER:
            raise ConfigError(f"--median-3d must be in 0..{MAX_MEDIAN_FILTER}, got {self.median_3d}")
        if not 0 <= self.erode <= MAX_EROSION:
            raise ConfigError(f"--erode must be in 0..{MAX_EROSION} voxels, got {self.erode}")
        if self.min_component < 0:
            raise ConfigError(f"--min-component must be >= 0 voxels, got {self.min_component}")

    @property
    def active(self) -> bool:
        """Whether any step is on."""
        return self.median_3d > 1 or self.erode > 0 or self.min_component > 0

    def describe(self) -> str:
        """'3D median 3, brain mask eroded by 2 voxels, components < 10 voxels dropped', or 'none'."""
        parts = []
        if self.median_3d > 1:
            parts.append(f"3D median {self.median_3d}")
        if self.erode > 0:
            parts.append(f"brain mask eroded by {self.erode} voxel(s)")
        if self.min_component > 0:
            parts.append(f"binary components < {self.min_component} voxels dropped")
        return ", ".join(parts) or "none"


NO_POSTPROCESS = PostProcess()
"""Maps as the methods made them."""


def median_3d(volume: np.ndarray, size: int) -> np.ndarray:
    """A cubic (size^3) median filter of a 3D map (scipy, reflecting borders); size <= 1 returns it unchanged."""
    return ndimage.median_filter(volume, size=size) if size > 1 else volume


def eroded(mask: np.ndarray, voxels: int) -> np.ndarray:
    """A 3D bool mask eroded by `voxels` 6-connected steps (outside the array counts as background)."""
    if voxels <= 0:
        return mask.astype(bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return ndimage.binary_erosion(mask.astype(bool), structure=structure, iterations=voxels, border_value=0)


def drop_small_components(binary: np.ndarray, min_size: int) -> np.ndarray:
    """A bool volume without its 26-connected (full neighbourhood) components of fewer than `min_size` voxels."""
    if min_size <= 1 or not binary.any():
        return binary.astype(bool)
    labels, _ = ndimage.label(binary, structure=np.ones((3,) * binary.ndim, dtype=bool))
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def candidate_thresholds(scores: np.ndarray, count: int = CANDIDATE_THRESHOLDS) -> np.ndarray:
    """Thresholds flagging from half of the voxels down to 1e-5 of them, log-spaced, for the rule `scores > t`.

    Each is the float64 just below a score value (a quantile, method 'higher'), so it flags every
    voxel tied with that score. For the best Dice after dropping small components, which has no
    closed form over thresholds.
    """
    if scores.size == 0:
        return np.array([np.inf])
    flagged = np.logspace(np.log10(0.5), -5, count)
    values = np.unique(np.quantile(scores.astype(np.float64), 1 - flagged, method="higher"))
    return np.nextafter(values, -np.inf)
