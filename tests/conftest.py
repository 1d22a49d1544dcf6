"""Shared fixtures: tiny synthetic scans with planted lesions, a tiny config, a SQLite MLflow store."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly_diffusion.data.manifest import ManifestRow, write_manifest

AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, 1.5, 0, -20.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])


def make_volume(
    rng: np.random.Generator, shape: tuple[int, int, int] = (24, 20, 10), lesion: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 'head': textured ellipsoid brain on a zero background, optionally a bright lesion.

    Returns (image, lesion mask, brain mask) as float32/uint8 arrays of `shape`.
    """
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = (grid[0] ** 2 / 0.8 + grid[1] ** 2 / 0.7 + grid[2] ** 2 / 1.2) < 1
    image = np.where(brain, 100 + 10 * rng.standard_normal(shape), 0).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    if lesion:
        centre = [s // 2 + int(rng.integers(-2, 3)) for s in shape[:2]]
        z0 = shape[2] // 2 - 2
        mask[centre[0] - 2 : centre[0] + 3, centre[1] - 2 : centre[1] + 3, z0 : z0 + 4] = 1
        mask &= brain
        image[mask > 0] += 80
    return image, mask, brain.astype(np.uint8)


def save(array: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    logging.getLogger("alembic").setLevel(logging.WARNING)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Six subjects (4 train, 1 val, 1 test), each with a lesion in some slices; returns the manifest."""
    rng = np.random.default_rng(0)
    rows = []
    folder = tmp_path / "data"
    folder.mkdir()
    for i, split in enumerate(["train", "train", "train", "train", "val", "test"]):
        image, mask, brain = make_volume(rng, lesion=True)
        rows.append(
            ManifestRow(
                subject=f"s{i}",
                split=split,  # type: ignore[arg-type]
                images=(save(image, folder / f"s{i}_t1.nii.gz"),),
                mask=save(mask, folder / f"s{i}_mask.nii.gz"),
                brainmask=save(brain, folder / f"s{i}_brain.nii.gz"),
            )
        )
    return write_manifest(rows, folder / "manifest.csv")


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store in tmp_path."""
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The MLflow UI tests run first. Late in one full pytest process (after ~370 tests) `adiff ui` did not stop within
    30 s of Ctrl-C, while the same tests pass alone or after any subset tried (2026-12-06); the cause is not found."""
    items.sort(key=lambda item: 0 if item.path.name == "test_ui.py" else 1)
