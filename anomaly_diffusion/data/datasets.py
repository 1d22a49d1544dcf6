"""Manifest -> preprocessed 2D slices with labels, held in memory for training and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anomaly_diffusion.config import DataConfig
from anomaly_diffusion.data.io import InputKind, load_scan, read_mask
from anomaly_diffusion.data.manifest import ManifestRow
from anomaly_diffusion.data.transforms import fit_preprocess, mask_to_slices, slice_lesion_pixels, to_slices
from anomaly_diffusion.errors import InputError
from anomaly_diffusion.labels import HEALTHY, PATHOLOGICAL, check_labels


@dataclass(frozen=True)
class VolumeInfo:
    """Facts about one loaded volume, for dataset summaries."""

    subject: str
    split: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    intensity_min: tuple[float, ...]
    intensity_max: tuple[float, ...]
    slices: int
    slices_pathological: int
    lesion_voxels: int
    kind: InputKind


@dataclass(frozen=True)
class SliceDataset:
    """Preprocessed slices of several volumes.

    Attributes:
        images: (N, C, S, S) float32 in normalised units.
        labels: (N,) int64, HEALTHY or PATHOLOGICAL.
        lesion_masks: (N, S, S) bool at model resolution (all False without a mask).
        subjects: (N,) subject id of each slice.
        volumes: facts about each loaded volume.
    """

    images: torch.Tensor
    labels: torch.Tensor
    lesion_masks: torch.Tensor
    subjects: np.ndarray
    volumes: tuple[VolumeInfo, ...] = ()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def count(self, label: int) -> int:
        """Number of slices with this label."""
        return int((self.labels == label).sum())

    def summary(self) -> dict[str, int]:
        """Counts for logs: subjects and slices per label."""
        return {
            "subjects": len(set(self.subjects.tolist())),
            "slices": len(self),
            "slices_healthy": self.count(HEALTHY),
            "slices_pathological": self.count(PATHOLOGICAL),
        }


def slice_labels(lesion_pixels: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """PATHOLOGICAL where a slice has >= min_lesion_pixels lesion voxels, else HEALTHY."""
    return np.where(lesion_pixels >= cfg.min_lesion_pixels, PATHOLOGICAL, HEALTHY).astype(np.int64)


def load_slices(
    rows: Sequence[ManifestRow],
    cfg: DataConfig,
    progress: Callable[[int, int], None] | None = None,
) -> SliceDataset:
    """Read, preprocess and label every volume of `rows`.

    Raises:
        InputError: unreadable files, wrong channel count, masks off the image grid, a row with
            neither mask nor label, or no slices at all.
    """
    images, labels, masks, subjects, volumes = [], [], [], [], []
    for i, row in enumerate(rows):
        scan = load_scan(row.images, expected_channels=cfg.image_channels)
        brain = read_mask(row.brainmask, scan) if row.brainmask else None
        state = fit_preprocess(scan.data, scan.affine, cfg, brainmask=brain, source=str(row.images[0]))
        slices = to_slices(scan.data, state, cfg)
        lesion_voxels = 0
        if row.mask is not None:
            lesion = read_mask(row.mask, scan)
            lesion_voxels = int(lesion.sum())
            row_labels = slice_labels(slice_lesion_pixels(lesion, state), cfg)
            row_masks = mask_to_slices(lesion, state)
        elif row.label is not None:
            row_labels = np.full(len(slices), row.label, dtype=np.int64)
            row_masks = torch.zeros(len(slices), cfg.image_size, cfg.image_size, dtype=torch.bool)
        else:
            raise InputError(f"{row.images[0]}: subject {row.subject!r} has neither a lesion mask nor a label")
        images.append(slices)
        labels.append(check_labels(row_labels, row.subject))
        masks.append(row_masks)
        subjects.extend([row.subject] * len(slices))
        volumes.append(
            VolumeInfo(
                subject=row.subject,
                split=row.split,
                shape=tuple(int(n) for n in scan.data.shape[1:]),
                spacing=tuple(round(float(z), 3) for z in np.linalg.norm(scan.affine[:3, :3], axis=0)),
                intensity_min=tuple(float(c.min()) for c in scan.data),
                intensity_max=tuple(float(c.max()) for c in scan.data),
                slices=len(slices),
                slices_pathological=int((row_labels == PATHOLOGICAL).sum()),
                lesion_voxels=lesion_voxels,
                kind=scan.kind,
            )
        )
        if progress is not None:
            progress(i + 1, len(rows))
    if not images:
        raise InputError("no volumes to load")
    return SliceDataset(
        images=torch.cat(images),
        labels=torch.from_numpy(np.concatenate(labels)),
        lesion_masks=torch.cat(masks),
        subjects=np.array(subjects),
        volumes=tuple(volumes),
    )
