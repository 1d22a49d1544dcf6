"""data_prep/folder.py and data_prep/labelled_images.py, and split assignment, on files made in tmp_path."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from skimage import io as skio

from anomaly_diffusion.config import DataConfig
from anomaly_diffusion.data.datasets import load_slices
from anomaly_diffusion.data.manifest import assign_splits, read_manifest
from anomaly_diffusion.errors import InputError
from anomaly_diffusion.labels import HEALTHY, PATHOLOGICAL

PREP = Path(__file__).parents[3] / "data_prep"


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PREP / script), *args], capture_output=True, text=True)


def test_assign_splits_is_by_subject_seeded_and_complete() -> None:
    subjects = [f"s{i}" for i in range(20)]
    splits = assign_splits(subjects + subjects[:5], val=0.15, test=0.15, seed=3)
    assert set(splits) == set(subjects)
    assert sorted(splits.values()).count("val") == 3 and list(splits.values()).count("test") == 3
    assert splits == assign_splits(subjects, 0.15, 0.15, seed=3)
    assert splits != assign_splits(subjects, 0.15, 0.15, seed=4)
    assert set(assign_splits(["a", "b", "c"], 0.1, 0.1).values()) == {"train", "val", "test"}
    with pytest.raises(InputError):
        assign_splits(subjects, 0.6, 0.5)


def test_generic_folder_with_id_patterns(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = tmp_path / "raw" / f"case{i}"
        folder.mkdir(parents=True)
        image = np.zeros((12, 12, 4), np.float32)
        image[2:10, 2:10] = rng.random((8, 8, 4)) + 1
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / "t1.nii.gz"))
        mask = np.zeros((12, 12, 4), np.uint8)
        mask[4:6, 4:6, 1] = 1
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(folder / "lesion.nii.gz"))
    out = tmp_path / "manifest.csv"
    result = _run(
        "folder.py",
        str(tmp_path / "raw"),
        "--out",
        str(out),
        "--channel",
        "{id}/t1.nii.gz",
        "--mask",
        "{id}/lesion.nii.gz",
    )
    assert result.returncode == 0, result.stderr
    rows = read_manifest(out)
    assert sorted(r.subject for r in rows) == [f"case{i}" for i in range(6)]
    data = load_slices(rows[:1], DataConfig(image_size=16, min_foreground_fraction=0.0))
    assert data.labels.tolist() == [HEALTHY, PATHOLOGICAL, HEALTHY, HEALTHY]
    missing = _run(
        "folder.py",
        str(tmp_path / "raw"),
        "--out",
        str(out),
        "--channel",
        "{id}/t1.nii.gz",
        "--mask",
        "{id}/seg.nii.gz",
    )
    assert missing.returncode == 1 and "seg.nii.gz not found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_labelled_2d_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for folder, label in (("healthy", 0), ("diseased", 1)):
        (tmp_path / "raw" / folder).mkdir(parents=True)
        for i in range(4):
            image = (rng.random((20, 24)) * 100 + 50 + 60 * label).astype(np.uint8)
            skio.imsave(tmp_path / "raw" / folder / f"p{i}_{folder}.png", image, check_contrast=False)
        np.save(tmp_path / "raw" / folder / f"p9_{folder}.npy", rng.random((20, 24)).astype(np.float32) + 1)
    out = tmp_path / "manifest.csv"
    result = _run("labelled_images.py", str(tmp_path / "raw"), "--out", str(out), "--subject-regex", r"^(p\d+)_")
    assert result.returncode == 0, result.stderr
    rows = read_manifest(out)
    assert len(rows) == 10 and {r.label for r in rows} == {0, 1}
    by_patient: dict[str, set[str]] = {}
    for row in rows:
        by_patient.setdefault(row.subject.split("#")[0], set()).add(row.split)
    assert all(len(s) == 1 for s in by_patient.values())  # a patient's images share one split
    data = load_slices(rows, DataConfig(image_size=16, min_foreground_fraction=0.0))
    assert len(data) == 10 and data.images.shape[1:] == (1, 16, 16)
    assert sorted(data.labels.tolist()) == [0] * 5 + [1] * 5
