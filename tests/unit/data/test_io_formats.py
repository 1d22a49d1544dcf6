"""Input formats users have (.nii, .nii.gz, NIfTI pairs, NRRD, MetaImage, colour PNG), refusing inputs
unlike the training data, and outputs colleagues can read (the umask's mode)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly_diffusion.data.io import InputKind, check_input_kind, load_scan, save_like, trained_on
from anomaly_diffusion.errors import InputError
from anomaly_diffusion.files import atomic_write_bytes
from anomaly_diffusion.usecases.common import output_stem

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


@pytest.mark.parametrize(
    ("name", "kind"), [("s.nii.gz", nib.Nifti1Image), ("s.nii", nib.Nifti1Image), ("s.hdr", nib.Nifti1Pair)]
)
def test_nifti_files_and_pairs_read_alike(tmp_path: Path, name: str, kind: type) -> None:
    data = np.random.default_rng(0).random((20, 18, 5)).astype(np.float32)
    nib.save(kind(data, AFFINE), tmp_path / name)
    for path in [tmp_path / name] + ([tmp_path / "s.img"] if name.endswith(".hdr") else []):
        scan = load_scan([path])
        assert scan.data.shape == (1, 20, 18, 5)
        np.testing.assert_allclose(scan.data[0], data, rtol=1e-6)
        np.testing.assert_allclose(scan.affine, AFFINE)
        assert output_stem(path) == "s"
        out = save_like(scan.data[0], scan, tmp_path / "out" / "map.nii.gz")  # outputs are .nii.gz whatever came in
        np.testing.assert_allclose(nib.load(out).affine, AFFINE)


def test_an_analyze_pair_is_refused_with_one_line(tmp_path: Path) -> None:
    nib.save(nib.AnalyzeImage(np.ones((10, 10, 3), np.float32), AFFINE), tmp_path / "a.hdr")
    with pytest.raises(InputError, match="not a NIfTI image"):
        load_scan([tmp_path / "a.hdr"])


def test_outputs_get_the_umask_mode_not_the_temporary_files_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(b"x", tmp_path / "shared" / "result.json")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert atomic_write_bytes(b"y", tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert not list((tmp_path / "shared").glob(".*.tmp"))  # no temporary file left beside it


OBLIQUE = np.array([[0.0, -1.2, 0.3, 10.0], [1.1, 0.0, 0.0, -20.0], [0.0, 0.2, 2.5, 5.5], [0.0, 0.0, 0.0, 1.0]])
"""Voxel -> world of a test volume, in the file's own space (columns: the step of each index)."""


def _volume(shape: tuple[int, ...] = (12, 10, 6)) -> np.ndarray:
    return np.random.default_rng(1).integers(-100, 900, shape).astype(np.int16)


@pytest.mark.parametrize(("space", "to_ras"), [("left-posterior-superior", [-1, -1, 1]), ("RAS", [1, 1, 1])])
def test_nrrd_reads_with_its_space_directions(tmp_path: Path, space: str, to_ras: list[int]) -> None:
    import nrrd

    data = _volume()
    header = {"space": space, "space directions": OBLIQUE[:3, :3].T, "space origin": OBLIQUE[:3, 3]}
    nrrd.write(str(tmp_path / "t1.nrrd"), data, header)

    scan = load_scan([tmp_path / "t1.nrrd"])

    np.testing.assert_array_equal(scan.data[0], data.astype(np.float32))
    np.testing.assert_allclose(scan.affine, np.diag([*to_ras, 1]) @ OBLIQUE)
    assert output_stem(tmp_path / "t1.nrrd") == "t1" and scan.kind.volume


def test_nrrd_without_orientation_is_an_lps_grid_and_a_scanner_space_is_refused(tmp_path: Path) -> None:
    import nrrd

    nrrd.write(str(tmp_path / "plain.nrrd"), _volume(), {"spacings": [0.5, 0.7, 2.0]})
    np.testing.assert_allclose(load_scan([tmp_path / "plain.nrrd"]).affine, np.diag([-0.5, -0.7, 2.0, 1.0]))
    header = {"space": "scanner-xyz", "space directions": np.eye(3), "space origin": np.zeros(3)}
    nrrd.write(str(tmp_path / "scanner.nrrd"), _volume(), header)
    with pytest.raises(InputError, match="NRRD space 'scanner-xyz' has no patient orientation"):
        load_scan([tmp_path / "scanner.nrrd"])
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4\n\n")
    with pytest.raises(InputError, match="corrupt or unreadable NRRD file"):
        load_scan([tmp_path / "bad.nrrd"])


@pytest.mark.parametrize("detached", [False, True])
def test_metaimage_reads_with_itk_conventions(tmp_path: Path, detached: bool) -> None:
    """A MetaImage written by hand as ITK writes it: LPS space, TransformMatrix listing each axis's direction."""
    data = _volume()
    spacing = np.linalg.norm(OBLIQUE[:3, :3], axis=0)
    directions = OBLIQUE[:3, :3] / spacing
    header = "\n".join(
        [
            "ObjectType = Image",
            "NDims = 3",
            "BinaryData = True",
            "BinaryDataByteOrderMSB = False",
            "TransformMatrix = " + " ".join(f"{v:.12g}" for v in directions.T.ravel()),
            "Offset = " + " ".join(f"{v:.12g}" for v in OBLIQUE[:3, 3]),
            "AnatomicalOrientation = RAI",
            "ElementSpacing = " + " ".join(f"{v:.12g}" for v in spacing),
            "DimSize = " + " ".join(str(n) for n in data.shape),
            "ElementType = MET_SHORT",
            f"ElementDataFile = {'t1.raw' if detached else 'LOCAL'}",
        ]
    ).encode()
    raw = data.astype("<i2").tobytes(order="F")  # x fastest
    if detached:
        (tmp_path / "t1.mhd").write_bytes(header + b"\n")
        (tmp_path / "t1.raw").write_bytes(raw)
    else:
        (tmp_path / "t1.mha").write_bytes(header + b"\n" + raw)
    path = tmp_path / ("t1.mhd" if detached else "t1.mha")

    scan = load_scan([path])

    np.testing.assert_array_equal(scan.data[0], data.astype(np.float32))
    np.testing.assert_allclose(scan.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ OBLIQUE, atol=1e-9)
    assert output_stem(path) == "t1"


def test_a_corrupt_metaimage_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4 4\nElementDataFile = LOCAL\n")
    with pytest.raises(InputError, match="corrupt or unreadable MetaImage file"):
        load_scan([tmp_path / "bad.mha"])


def test_colour_images_are_told_apart_from_grey_ones_stored_as_rgb(tmp_path: Path) -> None:
    from skimage import io as skio

    grey = np.random.default_rng(0).integers(0, 255, (20, 16)).astype(np.uint8)
    colour = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    alpha = np.full_like(grey, 255)
    cases = {
        "grey.png": (grey, False),
        "grey_rgb.png": (np.stack([grey] * 3, axis=-1), False),
        "grey_alpha.png": (np.stack([grey, alpha], axis=-1), False),
        "colour.png": (colour, True),
        "colour_alpha.png": (np.concatenate([colour, alpha[..., None]], axis=-1), True),
    }
    for name, (image, is_colour) in cases.items():
        skio.imsave(tmp_path / name, image, check_contrast=False)
        scan = load_scan([tmp_path / name])
        assert scan.colour is is_colour, name
        expected = grey if not is_colour else colour.mean(axis=-1)
        np.testing.assert_allclose(scan.data[0, :, :, 0], expected.T.astype(np.float32), rtol=1e-6)


def test_inputs_unlike_the_training_data_are_refused(tmp_path: Path) -> None:
    from skimage import io as skio

    volume, image = tmp_path / "t1.nii.gz", tmp_path / "photo.png"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((12, 10, 6)).astype(np.float32), AFFINE), volume)
    skio.imsave(image, np.random.default_rng(0).integers(0, 255, (20, 16, 3)).astype(np.uint8), check_contrast=False)
    volumes, greys = trained_on([InputKind(volume=True)] * 3), trained_on([InputKind(False), InputKind(False)])
    assert volumes == [{"volume": True, "colour": False}] and greys == [{"volume": False, "colour": False}]

    check_input_kind(load_scan([volume]), volumes)
    with pytest.raises(
        InputError, match=r"photo.png: a 2D colour image \(16x20\), but the model was trained on 3D volumes"
    ):
        check_input_kind(load_scan([image]), volumes)
    with pytest.raises(InputError, match=r"t1.nii.gz: a 3D volume \(12x10x6\), but the model was trained on 2D images"):
        check_input_kind(load_scan([volume]), greys)
    with pytest.raises(InputError, match=r"a colour image .* trained on greyscale images"):
        check_input_kind(load_scan([image]), greys)
    check_input_kind(load_scan([image]), trained_on([InputKind(False, colour=True)]))
    for old in (None, [], "garbage"):  # bundles saved before the record: any input
        check_input_kind(load_scan([image]), old)


def test_one_slice_of_a_scan_is_a_scan_and_a_picture_file_is_not(tmp_path: Path) -> None:
    """The kind check keys on what the input is (a scan file or a picture file), not on its slice count."""
    from skimage import io as skio

    rng = np.random.default_rng(0)
    one_slice, flat = tmp_path / "one.nii.gz", tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((12, 10, 1)).astype(np.float32), AFFINE), one_slice)
    nib.save(nib.Nifti1Image(rng.random((12, 10)).astype(np.float32), AFFINE), flat)
    grey, array = tmp_path / "grey.png", tmp_path / "slice.npy"
    skio.imsave(grey, rng.integers(0, 255, (10, 12)).astype(np.uint8), check_contrast=False)
    np.save(array, rng.random((12, 10)).astype(np.float32))
    volumes, greys = trained_on([InputKind(volume=True)]), trained_on([InputKind(volume=False)])

    for path in (one_slice, flat):
        scan = load_scan([path])
        assert not scan.picture and not scan.kind.volume
        check_input_kind(scan, volumes)  # one slice of a scan, for a model of volumes
        check_input_kind(scan, greys)  # and for a model of 2D images, as before
    for path, shape in ((grey, "12x10"), (array, "12x10")):
        scan = load_scan([path])
        assert scan.picture
        with pytest.raises(InputError, match=rf"{path.name}: a 2D image \({shape}\), but the model was trained on 3D"):
            check_input_kind(scan, volumes)
        check_input_kind(scan, greys)
