"""DICOM series folder -> (X, Y, Z) volume + RAS+ affine, on tiny series written with pydicom."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_series import (
    INTERCEPT,
    PATIENT_ID,
    PATIENT_NAME,
    PIXEL_SPACING,
    SHAPE,
    SLICE_GAP,
    SLOPE,
    _file,
    _oblique_orientation,
    _positions,
    _stored_volume,
    _write_enhanced,
    _write_series,
    _write_slice,
)
from pydicom.data import get_testdata_file
from pydicom.uid import MRImageStorage, generate_uid

from anomaly_diffusion.data.dicom import DicomSource, DicomVolume, read_dicom_series
from anomaly_diffusion.errors import InputError


def _world_ras(position: Sequence[str], i: float, j: float) -> np.ndarray:
    """Where voxel (i, j) of the slice at `position` lies, in RAS+ mm, from DICOM's own definition."""
    along_i, along_j = _oblique_orientation()
    row_spacing, column_spacing = (float(s) for s in PIXEL_SPACING)
    lps = np.array([float(p) for p in position]) + i * column_spacing * along_i + j * row_spacing * along_j
    return lps * np.array([-1.0, -1.0, 1.0])


@pytest.mark.parametrize("gap", [SLICE_GAP, -SLICE_GAP])
def test_series_round_trips_data_order_and_geometry(tmp_path: Path, gap: float) -> None:
    stored = _stored_volume()
    positions = _write_series(tmp_path, stored, gap=gap)
    (tmp_path / ".DS_Store").write_bytes(b"\0" * 300)
    (tmp_path / "notes.txt").write_text("not a DICOM file\n")

    volume = read_dicom_series(tmp_path)

    # Slices ascend along the normal: a negative gap means the last written slice comes first.
    order = list(range(SHAPE[2])) if gap > 0 else list(range(SHAPE[2]))[::-1]
    assert volume.data.dtype == np.float32 and volume.data.shape == SHAPE
    np.testing.assert_array_equal(volume.data, stored[:, :, order].astype(np.float32) * SLOPE + INTERCEPT)
    assert volume.affine.dtype == np.float64 and volume.affine.shape == (4, 4)
    for i, j, k in [(0, 0, 0), (4, 0, 0), (0, 3, 0), (0, 0, 5), (4, 3, 5), (2, 1, 3)]:
        expected = _world_ras(positions[order[k]], i, j)
        np.testing.assert_allclose((volume.affine @ [i, j, k, 1])[:3], expected, atol=1e-5)
    assert abs(np.linalg.det(volume.affine[:3, :3])) == pytest.approx(0.9 * 1.3 * SLICE_GAP, rel=1e-5)


def test_single_slice_agrees_with_nibabel_dicom_wrapper(tmp_path: Path) -> None:
    """nibabel's wrapper indexes (row j, column i) and gives an LPS affine; ours is (i, j) and RAS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its "highly experimental" notice at import
        from nibabel.nicom import dicomwrappers

    _write_series(tmp_path, _stored_volume(), skip=range(1, SHAPE[2]))
    wrapper = dicomwrappers.wrapper_from_file(str(next(tmp_path.iterdir())))

    volume = read_dicom_series(tmp_path)

    np.testing.assert_array_equal(volume.data[:, :, 0], wrapper.get_data().T)
    theirs = np.diag([-1.0, -1.0, 1.0, 1.0]) @ wrapper.affine
    np.testing.assert_allclose(volume.affine[:3, [0, 1, 3]], theirs[:3, [1, 0, 3]], atol=1e-6)


def test_enhanced_multiframe_uses_functional_groups(tmp_path: Path) -> None:
    stored = _stored_volume()
    file_order = np.random.default_rng(2).permutation(SHAPE[2])  # frames stored out of spatial order
    positions = _write_enhanced(tmp_path / "enhanced.dcm", stored, file_order)

    volume = read_dicom_series(tmp_path)

    np.testing.assert_array_equal(volume.data, stored.astype(np.float32) * SLOPE + INTERCEPT)
    for i, j, k in [(0, 0, 0), (4, 3, 5), (1, 2, 4)]:
        np.testing.assert_allclose((volume.affine @ [i, j, k, 1])[:3], _world_ras(positions[k], i, j), atol=1e-5)


def test_multiframe_without_geometry_keeps_file_order_with_identity_orientation(tmp_path: Path) -> None:
    stored = _stored_volume()
    ds = _file(MRImageStorage, generate_uid(), rows=SHAPE[1], cols=SHAPE[0])
    ds.NumberOfFrames = SHAPE[2]
    ds.PixelSpacing = list(PIXEL_SPACING)
    ds.SliceThickness = "3.0"
    ds.PixelData = np.ascontiguousarray(np.moveaxis(stored, 2, 0).transpose(0, 2, 1).astype("<i2")).tobytes()
    ds.save_as(tmp_path / "frames.dcm", enforce_file_format=True)

    with pytest.warns(UserWarning, match="geometry missing"):
        volume = read_dicom_series(tmp_path)

    np.testing.assert_array_equal(volume.data, stored.astype(np.float32))
    np.testing.assert_allclose(volume.affine, np.diag([-1.3, -0.9, 3.0, 1.0]))


def test_two_series_are_refused_on_one_line_naming_both(tmp_path: Path) -> None:
    first, second = generate_uid(), generate_uid()
    _write_series(tmp_path, _stored_volume(), series_uid=first)
    _write_series(tmp_path / "other", _stored_volume((5, 4, 2)), series_uid=second)
    for path in (tmp_path / "other").iterdir():
        shutil.move(path, tmp_path / f"second_{path.name}")

    with pytest.raises(InputError) as info:
        read_dicom_series(tmp_path)

    message = str(info.value)
    assert f"{first} (6 files)" in message and f"{second} (2 files)" in message
    assert "\n" not in message and "one series" in message
    assert PATIENT_NAME not in message and PATIENT_ID not in message


def test_folder_without_dicom_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match="no DICOM files"):
        read_dicom_series(tmp_path)


def test_dicom_without_pixel_data_is_refused(tmp_path: Path) -> None:
    _write_slice(tmp_path / "empty", _stored_volume()[:, :, 0], _positions(1, 1.0)[0], generate_uid(), 1, pixels=False)
    with pytest.raises(InputError, match="no pixel data") as info:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_slice_is_refused_with_min_and_max_spacing(tmp_path: Path) -> None:
    _write_series(tmp_path, _stored_volume(), skip=[3])
    with pytest.raises(InputError, match=r"uneven slice spacing \(min 2\.5 mm, max 5 mm\)"):
        read_dicom_series(tmp_path)


def test_duplicate_positions_are_refused(tmp_path: Path) -> None:
    stored, uid = _stored_volume(), generate_uid()
    positions = _write_series(tmp_path, stored, series_uid=uid)
    _write_slice(tmp_path / "echo2", stored[:, :, 2], positions[2], uid, 99)
    with pytest.raises(InputError, match="repeat another slice's position"):
        read_dicom_series(tmp_path)


def test_mixed_slice_sizes_are_refused(tmp_path: Path) -> None:
    uid = generate_uid()
    positions = _write_series(tmp_path, _stored_volume(), series_uid=uid, skip=[5])
    _write_slice(tmp_path / "big", np.zeros((6, 4), np.int16), positions[5], uid, 6)
    with pytest.raises(InputError, match="different sizes"):
        read_dicom_series(tmp_path)


def _pydicom_test_file(tmp_path: Path, name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled and downloads are off")
    assert isinstance(path, str)
    shutil.copy(path, tmp_path / name)
    return tmp_path / name


def test_pydicom_mr_small_reads_as_one_slice(tmp_path: Path) -> None:
    path = _pydicom_test_file(tmp_path, "MR_small.dcm")
    ds = pydicom.dcmread(path)

    volume = read_dicom_series(tmp_path)

    assert volume.data.shape == (64, 64, 1) and np.isfinite(volume.data).all()
    np.testing.assert_array_equal(volume.data[:, :, 0], ds.pixel_array.T.astype(np.float32))
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(volume.affine[:3, 3], ipp * [-1, -1, 1])
    np.testing.assert_allclose(np.diag(volume.affine), [-0.3125, -0.3125, 0.8, 1.0])
    assert volume.series_uid == ds.SeriesInstanceUID
    # the headers travel (for DICOM outputs) but never show in a repr that might reach a log
    assert set(vars(volume)) == {"data", "affine", "series_uid", "source"}
    assert str(ds.PatientName) not in repr(volume) and str(ds.PatientID) not in repr(volume)
    assert all("PixelData" not in header for header in volume.source.datasets)  # pixels live in data only


def test_pydicom_ct_small_applies_rescale(tmp_path: Path) -> None:
    path = _pydicom_test_file(tmp_path, "CT_small.dcm")
    ds = pydicom.dcmread(path)
    volume = read_dicom_series(tmp_path)
    expected = ds.pixel_array.T.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.data[:, :, 0], expected.astype(np.float32))


def test_pydicom_emri_small_multiframe(tmp_path: Path) -> None:
    path = _pydicom_test_file(tmp_path, "emri_small.dcm")
    ds = pydicom.dcmread(path)
    volume = read_dicom_series(tmp_path)
    assert volume.data.shape == (int(ds.Columns), int(ds.Rows), int(ds.NumberOfFrames))
    assert np.isfinite(volume.data).all()


def test_errors_about_a_real_file_hide_patient_identifiers(tmp_path: Path) -> None:
    source = get_testdata_file("MR_small.dcm", download=False)
    if source is None:
        pytest.skip("pydicom test file MR_small.dcm is not bundled")
    assert isinstance(source, str)
    ds = pydicom.dcmread(source)
    identifiers = [str(ds.PatientName), *str(ds.PatientName).split("^"), str(ds.PatientID)]

    duplicate = tmp_path / "duplicate"
    duplicate.mkdir()
    shutil.copy(source, duplicate / "a.dcm")
    shutil.copy(source, duplicate / "b.dcm")
    two_series = tmp_path / "two_series"
    two_series.mkdir()
    shutil.copy(source, two_series / "a.dcm")
    other = pydicom.dcmread(source)
    other.SeriesInstanceUID = generate_uid()
    other.save_as(two_series / "b.dcm")
    no_pixels = tmp_path / "no_pixels"
    no_pixels.mkdir()
    stripped = pydicom.dcmread(source)
    del stripped.PixelData
    stripped.save_as(no_pixels / "a.dcm")

    for folder in (duplicate, two_series, no_pixels):
        with pytest.raises(InputError) as info:
            read_dicom_series(folder)
        message = str(info.value)
        assert "\n" not in message
        assert not [identifier for identifier in identifiers if identifier and identifier in message], message


def test_not_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a folder"):
        read_dicom_series(tmp_path / "missing")


def test_dicom_volume_is_frozen() -> None:
    volume = DicomVolume(np.zeros((1, 1, 1), np.float32), np.eye(4), "1.2.3", DicomSource((), (), False))
    with pytest.raises(AttributeError):
        volume.series_uid = "4.5.6"  # type: ignore[misc]
