"""Synthetic lesions with known masks, blended into a brain volume (for the demo dataset and tests).

Two kinds (`LESION_KINDS`):
- `bright`: hyperintense blobs in white matter, 1.5-1.9x its mean intensity: out of range, so a
  threshold on the raw intensity finds them (as raw FLAIR finds most of a glioma);
- `grey`: masses of grey-matter intensity inside white matter: out of place, not out of range.
  Every intensity they have also occurs in healthy cortex, so no intensity threshold separates
  them; only a model of where grey matter belongs does.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

LESION_DIAMETER_MM = (8.0, 25.0)
LESION_CONTRAST = (1.5, 1.9)  # lesion intensity / subject's mean white-matter intensity
MIN_LESION_RADIUS_VOXELS = 1.1  # keeps a centre voxel and its 6 neighbours at coarse voxels
LESION_EDGE_VOXELS = 0.5  # width of the soft edge of the blend weight
GREY_JITTER = 0.05  # a grey mass's intensity: the subject's mean grey-matter intensity x (1 +- this)
_MAX_LESIONS = 3
LESION_KINDS = {
    "bright": "hyperintense blobs in white matter (out of range: raw intensity finds them)",
    "grey": "masses of grey-matter intensity inside white matter (out of place: raw intensity cannot)",
}


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix for angles (radians) about the three axes, applied x, then y, then z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid_weight(coords: np.ndarray, centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Soft indicator of an ellipsoid: 1 / (1 + exp((rho - 1) / tau)), > 0.5 iff rho < 1.

    Args:
        coords: voxel coordinates, shape (3, *box).
        centre: ellipsoid centre in voxels, shape (3,).
        radii: semi-axes in voxels, shape (3,).
        rotation: orientation of the semi-axes, shape (3, 3).
    """
    offset = coords - centre.reshape(3, *([1] * (coords.ndim - 1)))
    local = np.tensordot(rotation.T, offset, axes=1)
    rho = np.sqrt(sum((local[i] / radii[i]) ** 2 for i in range(3)))
    # tau makes the edge about LESION_EDGE_VOXELS wide whatever the ellipsoid's size.
    tau = LESION_EDGE_VOXELS / float(radii.mean())
    return 1.0 / (1.0 + np.exp(np.clip((rho - 1.0) / tau, -50.0, 50.0)))


def add_lesions(
    volume: np.ndarray,
    wm_mask: np.ndarray,
    rng: np.random.Generator,
    voxel_size_mm: float,
    *,
    brain_mask: np.ndarray | None = None,
    n_lesions: int | None = None,
    grey_intensity: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Add blobby lesions centred in white matter: hyperintense, or of grey-matter intensity.

    Each lesion is the union of a main ellipsoid (diameter 8-25 mm, at least
    2 x `MIN_LESION_RADIUS_VOXELS` voxels so it survives coarse voxels) and 0-2 smaller
    ellipsoids off its centre, all randomly oriented. Its soft weight w (0..1) blends the
    intensity towards k x mean WM intensity with k in [1.5, 1.9]:
    v <- (1 - w) v + w k mean_wm; with `grey_intensity` g (a `grey` lesion) towards g x (1 +- 5 %).
    The centre is a white-matter voxel (inside the brain mask when one is given), at least 0.6 x
    the lesion's radius deep in white matter where there is such a voxel; the lesion mask is
    w > 0.5 and always contains the centre voxel.

    Args:
        volume: intensities, shape (X, Y, Z); not modified.
        wm_mask: white-matter mask or probability (WM where > 0.5), shape (X, Y, Z).
        rng: source of randomness.
        voxel_size_mm: isotropic voxel edge, to size the lesions in mm.
        brain_mask: if given (brain where > 0.5), lesions are cut to the brain.
        n_lesions: number of lesions; random in 1..3 when None.
        grey_intensity: the subject's mean grey-matter intensity: makes `grey` lesions (None: `bright`).

    Returns:
        The lesioned volume (float32, same shape) and the lesion mask (uint8 0/1).

    Raises:
        ValueError: if `wm_mask` has no white matter or the shapes differ.
    """
    if volume.shape != wm_mask.shape or volume.ndim != 3:
        raise ValueError(f"volume {volume.shape} and wm_mask {wm_mask.shape} must be 3D alike")
    if brain_mask is not None and brain_mask.shape != volume.shape:
        raise ValueError(f"brain_mask {brain_mask.shape} must match volume {volume.shape}")
    inside = None if brain_mask is None else (brain_mask > 0.5)
    wm = wm_mask > 0.5 if inside is None else (wm_mask > 0.5) & inside
    if not wm.any():
        raise ValueError("wm_mask has no white-matter voxel (inside the brain) to centre a lesion on")
    out = np.array(volume, dtype=np.float32, copy=True)
    weight_max = np.zeros(volume.shape, dtype=np.float32)
    mean_wm = float(out[wm].mean())
    depth = ndimage.distance_transform_edt(wm)
    count = int(rng.integers(1, _MAX_LESIONS + 1)) if n_lesions is None else n_lesions
    for _ in range(count):
        diameter = rng.uniform(*LESION_DIAMETER_MM)
        radius = max(diameter / 2 / voxel_size_mm, MIN_LESION_RADIUS_VOXELS)
        # A centre at least 0.6 radius deep in WM keeps most of the lesion in WM where possible.
        candidates = np.argwhere(depth >= min(max(1.0, 0.6 * radius), depth.max()))
        centre = candidates[rng.integers(len(candidates))].astype(np.float64)
        parts = [(centre, np.maximum(radius * rng.uniform(0.75, 1.3, 3), MIN_LESION_RADIUS_VOXELS))]
        for _ in range(int(rng.integers(0, 3))):
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            parts.append(
                (
                    centre + direction * radius * rng.uniform(0.4, 0.8),
                    radius * rng.uniform(0.4, 0.7, 3),
                )
            )
        half = math.ceil(2.5 * radius) + 2
        lo = np.maximum(centre.astype(int) - half, 0)
        hi = np.minimum(centre.astype(int) + half + 1, volume.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        coords = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")).astype(
            np.float64
        )
        weight = np.zeros(coords.shape[1:])
        for part_centre, radii in parts:
            rotation = rotation_matrix(rng.uniform(-np.pi, np.pi, 3))
            weight = np.maximum(weight, _ellipsoid_weight(coords, part_centre, radii, rotation))
        if inside is not None:
            weight = weight * inside[box]
        if grey_intensity is None:
            target = rng.uniform(*LESION_CONTRAST) * mean_wm
        else:
            target = grey_intensity * rng.uniform(1 - GREY_JITTER, 1 + GREY_JITTER)
        out[box] = (1 - weight) * out[box] + weight * target
        weight_max[box] = np.maximum(weight_max[box], weight)
    return out, (weight_max > 0.5).astype(np.uint8)
