import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly_diffusion.data.io import check_writable, load_scan, read_mask, save_like
from anomaly_diffusion.data.manifest import ManifestRow, read_manifest, write_manifest
from anomaly_diffusion.errors import InputError, OutputError


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def test_manifest_round_trip_with_relative_paths(tmp_path: Path) -> None:
    image = _nifti(tmp_path / "a.nii.gz", np.ones((4, 4, 2), np.float32))
    rows = [ManifestRow("s1", "train", (image,), label=1), ManifestRow("s2", "val", (image,), mask=image)]
    path = write_manifest(rows, tmp_path / "m.csv")
    assert "a.nii.gz" in path.read_text() and str(tmp_path) not in path.read_text()
    assert read_manifest(path) == rows
    assert [r.subject for r in read_manifest(path, splits=["val"])] == ["s2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("subject,split\ns,train\n", "lacks column"),
        ("subject,split,images\ns,holdout,a.nii.gz\n", "split must be"),
        ("subject,split,images\ns,train,missing.nii.gz\n", "file not found"),
        ("subject,split,images,label\ns,train,a.nii.gz,2\n", "labels must be"),
        ("subject,split,images\ns,train,a.nii.gz\ns,val,a.nii.gz\n", "two splits"),
        ("subject,split,images\n", "no rows"),
    ],
)
def test_manifest_errors(tmp_path: Path, text: str, message: str) -> None:
    _nifti(tmp_path / "a.nii.gz", np.ones((4, 4, 2), np.float32))
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        read_manifest(tmp_path / "m.csv")


def test_bad_scans_give_one_line_errors(tmp_path: Path) -> None:
    good = _nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).random((10, 10, 3)).astype(np.float32))
    nan = np.ones((10, 10, 3), np.float32)
    nan[0, 0, 0] = np.nan
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"hello"))
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[:200])
    cases = {
        tmp_path / "missing.nii.gz": "file not found",
        _nifti(tmp_path / "nan.nii.gz", nan): "NaN or Inf",
        _nifti(tmp_path / "zero.nii.gz", np.zeros((10, 10, 3), np.float32)): "constant",
        _nifti(tmp_path / "4d.nii.gz", np.ones((10, 10, 3, 2), np.float32)): "4D image",
        tmp_path / "text.nii.gz": "not a NIfTI image",
        truncated: "not a NIfTI image",
    }
    for path, message in cases.items():
        with pytest.raises(InputError, match=message) as info:
            load_scan([path])
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(InputError, match="expects 2 channel"):
        load_scan([good], expected_channels=2)


def test_mask_on_another_grid_is_refused(tmp_path: Path) -> None:
    scan = load_scan([_nifti(tmp_path / "a.nii.gz", np.random.default_rng(0).random((10, 10, 3)).astype(np.float32))])
    with pytest.raises(InputError, match="mask shape"):
        read_mask(_nifti(tmp_path / "m.nii.gz", np.ones((10, 10, 4), np.float32)), scan)


@pytest.mark.parametrize("shape", [(11, 9, 3), (11, 9)])
def test_outputs_keep_the_input_geometry(tmp_path: Path, shape: tuple[int, ...]) -> None:
    affine = np.array([[0, 0, 1.2, 3], [-0.9, 0, 0, 4], [0, 2.0, 0, -5], [0, 0, 0, 1]])
    source = _nifti(tmp_path / "in.nii.gz", np.random.default_rng(1).random(shape).astype(np.float32), affine)
    scan = load_scan([source])
    out = save_like(scan.data[0] * 2, scan, tmp_path / "out.nii.gz")
    image = nib.load(str(out))
    assert image.shape == shape
    assert np.allclose(image.affine, nib.load(str(source)).affine)
    assert np.allclose(image.get_fdata(), nib.load(str(source)).get_fdata() * 2, atol=1e-6)


def test_existing_output_is_refused_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "o.nii.gz").write_bytes(b"keep")
    with pytest.raises(OutputError, match="--overwrite"):
        check_writable(tmp_path / "o.nii.gz", overwrite=False)
    check_writable(tmp_path / "o.nii.gz", overwrite=True)
