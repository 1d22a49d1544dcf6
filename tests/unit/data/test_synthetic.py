"""Tests of the demo dataset built from nilearn's MNI152 template (6 mm voxels, 6 subjects)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from anomaly_diffusion.data import synthetic
from anomaly_diffusion.data.manifest import ManifestRow, read_manifest
from anomaly_diffusion.data.synthetic import add_lesions, build_demo_dataset, load_template
from anomaly_diffusion.errors import ConfigError, InputError

VOXEL_MM = 6.0
N_SUBJECTS = 6


def _build(root: Path, seed: int) -> Path:
    return build_demo_dataset(root, n_subjects=N_SUBJECTS, voxel_size_mm=VOXEL_MM, seed=seed)


def _image(path: Path | None) -> nib.Nifti1Image:
    assert path is not None
    return cast(nib.Nifti1Image, nib.load(path))


def _array(path: Path | None) -> np.ndarray:
    return np.asanyarray(_image(path).dataobj)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Manifests of three builds: seed 0 twice (in two folders) and seed 1."""
    return {
        name: _build(tmp_path_factory.mktemp(name), seed)
        for name, seed in (("seed0", 0), ("seed0_again", 0), ("seed1", 1))
    }


@pytest.fixture(scope="module")
def rows(built: dict[str, Path]) -> list[ManifestRow]:
    return read_manifest(built["seed0"])


def _lesioned(row: ManifestRow) -> bool:
    return bool(_array(row.mask).any())


def test_manifest_path_and_splits_by_subject(built: dict[str, Path], rows: list[ManifestRow]) -> None:
    assert built["seed0"].name == "manifest.csv"
    subjects = [row.subject for row in rows]
    assert len(rows) == N_SUBJECTS
    assert len(set(subjects)) == N_SUBJECTS
    splits = [row.split for row in rows]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (4, 1, 1)
    assert all(row.label is None for row in rows)
    train = [_lesioned(row) for row in rows if row.split == "train"]
    test = [_lesioned(row) for row in rows if row.split == "test"]
    assert any(train) and not all(train), "train needs healthy and lesioned subjects"
    assert any(test), "test needs a lesioned subject"
    assert sum(_lesioned(row) for row in rows) == N_SUBJECTS // 2


def test_files_share_one_grid(rows: list[ManifestRow]) -> None:
    shape = load_template(VOXEL_MM).t1.shape
    first = _image(rows[0].images[0])
    for row in rows:
        assert len(row.images) == 1
        assert row.images[0].name == f"{row.subject}_t1.nii.gz"
        assert row.mask is not None and row.mask.name == f"{row.subject}_lesion.nii.gz"
        assert row.brainmask is not None and row.brainmask.name == f"{row.subject}_brainmask.nii.gz"
        images = [_image(p) for p in (row.images[0], row.mask, row.brainmask)]
        assert [image.get_data_dtype() for image in images] == [np.float32, np.uint8, np.uint8]
        for image in images:
            assert image.shape == shape
            np.testing.assert_allclose(image.affine, first.affine)
            assert int(image.header["sform_code"]) > 0 and int(image.header["qform_code"]) > 0
            np.testing.assert_allclose(image.header.get_zooms(), [VOXEL_MM] * 3)
    # 6 mm voxels of the template's 1 mm grid: the first covers 1 mm voxels 0..5, centre 2.5.
    template_affine = _image(synthetic.template_path("t1")).affine
    np.testing.assert_allclose(first.affine[:3, :3], template_affine[:3, :3] * VOXEL_MM)
    np.testing.assert_allclose(first.affine[:3, 3], template_affine[:3, :3] @ [2.5, 2.5, 2.5] + template_affine[:3, 3])


def test_masks_and_intensities(rows: list[ManifestRow]) -> None:
    wm = load_template(VOXEL_MM).wm > 0.9
    for row in rows:
        t1, lesion, brain = _array(row.images[0]), _array(row.mask), _array(row.brainmask)
        assert set(np.unique(lesion)) <= {0, 1} and set(np.unique(brain)) == {0, 1}
        assert np.isfinite(t1).all() and t1.min() >= 0
        assert not t1[brain == 0].any(), "skull-stripped: zero outside the brain"
        if not lesion.any():
            continue
        assert not (lesion.astype(bool) & (brain == 0)).any(), "lesions lie inside the brain"
        # Deformations are under one 6 mm voxel, so the template's deep WM stays WM.
        normal_wm = wm & ~ndimage.binary_dilation(lesion.astype(bool))
        assert t1[lesion == 1].mean() > 1.2 * t1[normal_wm].mean(), "lesions are hyperintense"


def test_same_seed_same_data_other_seed_other_data(built: dict[str, Path]) -> None:
    first, again, other = (read_manifest(built[name]) for name in ("seed0", "seed0_again", "seed1"))
    for a, b in zip(first, again, strict=True):
        assert (a.subject, a.split) == (b.subject, b.split)
        for path_a, path_b in ((a.images[0], b.images[0]), (a.mask, b.mask), (a.brainmask, b.brainmask)):
            np.testing.assert_array_equal(_array(path_a), _array(path_b))
    assert any(not np.array_equal(_array(a.images[0]), _array(c.images[0])) for a, c in zip(first, other, strict=True))


@pytest.mark.parametrize(
    "kwargs",
    [{"n_subjects": 3}, {"lesioned_fraction": 0.0}, {"voxel_size_mm": 0.5}, {"splits": (0.5, 0.5, 0.5)}],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        build_demo_dataset(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_missing_template_raises_input_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="nilearn"):
        build_demo_dataset(tmp_path, n_subjects=4, voxel_size_mm=VOXEL_MM)


def test_missing_template_file_raises_input_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(synthetic.TEMPLATE_FILES, "t1", "no_such_template.nii.gz")
    with pytest.raises(InputError, match="no_such_template"):
        build_demo_dataset(tmp_path, n_subjects=4, voxel_size_mm=VOXEL_MM)


def _phantom(n: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ball brain (0.6) with a central ball of white matter (0.8), shape (n, n, n)."""
    radius = np.linalg.norm(np.indices((n, n, n)) - (n - 1) / 2, axis=0)
    brain = radius <= 0.45 * n
    wm = radius <= 0.25 * n
    volume = np.where(wm, 0.8, np.where(brain, 0.6, 0.0)).astype(np.float32)
    return volume, wm, brain


def test_add_lesions_hyperintense_blobs_in_white_matter() -> None:
    volume, wm, brain = _phantom()
    original = volume.copy()
    for seed in range(5):
        out, mask = add_lesions(volume, wm, np.random.default_rng(seed), 2.0, brain_mask=brain)
        np.testing.assert_array_equal(volume, original)  # the input is not modified
        assert out.dtype == np.float32 and mask.dtype == np.uint8 and mask.shape == volume.shape
        assert mask.any()
        assert not (mask.astype(bool) & ~brain).any()
        labels, count = ndimage.label(mask)
        assert 1 <= count <= 3
        for k in range(1, count + 1):
            assert (wm & (labels == k)).any(), "each lesion touches white matter"
        assert out[mask == 1].min() > 0.8, "lesion voxels are brighter than white matter"
        assert out[mask == 1].max() <= 1.9 * 0.8 + 1e-5
        far = ndimage.distance_transform_edt(~mask.astype(bool)) > 6
        np.testing.assert_allclose(out[far], volume[far], atol=1e-3)


def test_add_lesions_is_deterministic_per_generator() -> None:
    volume, wm, brain = _phantom()
    first = add_lesions(volume, wm, np.random.default_rng(3), 2.0, brain_mask=brain)
    again = add_lesions(volume, wm, np.random.default_rng(3), 2.0, brain_mask=brain)
    other = add_lesions(volume, wm, np.random.default_rng(4), 2.0, brain_mask=brain)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_add_lesions_survive_coarse_voxels() -> None:
    volume, wm, brain = _phantom(12)
    for seed in range(20):
        _, mask = add_lesions(volume, wm, np.random.default_rng(seed), 6.0, brain_mask=brain, n_lesions=1)
        assert mask.sum() >= 2


def test_add_lesions_needs_white_matter() -> None:
    volume, wm, _ = _phantom()
    with pytest.raises(ValueError, match="white-matter"):
        add_lesions(volume, np.zeros_like(wm), np.random.default_rng(0), 2.0)


def test_grey_lesions_have_grey_matter_intensity_inside_white_matter() -> None:
    volume, wm, brain = _phantom()  # WM 0.8, other brain 0.6
    for seed in range(5):
        out, mask = add_lesions(volume, wm, np.random.default_rng(seed), 2.0, brain_mask=brain, grey_intensity=0.6)
        lesion = out[mask == 1]
        assert lesion.min() >= 0.6 * 0.95 - 1e-5, "blended towards grey matter (+- 5 %), never darker"
        assert lesion.max() <= 0.8 + 1e-5, "never brighter than the white matter it replaces"
        assert lesion.mean() < 0.7, "closer to grey matter than to white matter"


def test_both_lesion_kinds_reach_the_held_out_splits(tmp_path: Path) -> None:
    manifest = build_demo_dataset(tmp_path, n_subjects=16, voxel_size_mm=VOXEL_MM, lesion_kinds=("grey", "bright"))
    kinds = synthetic.read_lesion_kinds(manifest)
    rows = read_manifest(manifest)
    assert set(kinds) == {r.subject for r in rows}
    for split in ("val", "test"):  # 2 subjects each: one of each kind
        assert {kinds[r.subject] for r in rows if r.split == split} == {"grey", "bright"}, split
    for row in rows:
        lesion = _array(row.mask)
        assert lesion.any() == (kinds[row.subject] != "none")
        if lesion.any():  # at least MIN_LESION_ML of lesion
            assert lesion.sum() * VOXEL_MM**3 / 1000 >= synthetic.MIN_LESION_ML
    with pytest.raises(ConfigError, match="lesion_kinds"):
        build_demo_dataset(tmp_path / "x", n_subjects=8, voxel_size_mm=VOXEL_MM, lesion_kinds=("purple",))
