"""Reading scans (NIfTI files or DICOM series folders) and writing outputs in the input's space.

A `Scan` carries its geometry (affine, the input's own spatial shape and NIfTI header), so every
output is written on exactly the input's voxel grid. Errors are one line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from anomaly_diffusion.errors import InputError, OutputError
from anomaly_diffusion.files import atomic_write


@dataclass(frozen=True)
class Scan:
    """A scan as (C, X, Y, Z) float32 with its geometry.

    Attributes:
        data: intensities, (C, X, Y, Z); a 2D input has Z = 1.
        affine: voxel -> world (RAS+ mm), (4, 4).
        spatial_shape: the input file's own spatial shape, (X, Y) or (X, Y, Z), for outputs.
        header: the first input's NIfTI header (None for DICOM), the template for outputs.
        sources: the input paths, one per channel.
    """

    data: np.ndarray
    affine: np.ndarray
    spatial_shape: tuple[int, ...]
    header: nib.Nifti1Header | None
    sources: tuple[Path, ...]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0


MAX_VOXELS = 2**31  # a header claiming more is corrupt, not a scan
MIN_SIZE = 8  # in-plane voxels: anything smaller is not an image the model can say anything about


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header | None]:
    # Corrupt files make nibabel, numpy, gzip and zlib raise many exception types; at this file
    # boundary every one of them means the same to the user: the file is unreadable.
    try:
        image = nib.load(str(path))
    except nib.filebasedimages.ImageFileError as exc:
        raise InputError(f"{path}: not a NIfTI image") from exc
    except Exception as exc:
        raise InputError(f"{path}: corrupt or unreadable NIfTI header ({exc.__class__.__name__})") from exc
    # single files (.nii, .nii.gz) and pairs (.hdr + .img) alike; Analyze 7.5 pairs are refused
    if not isinstance(image, nib.Nifti1Pair | nib.Nifti2Pair):
        raise InputError(f"{path}: not a NIfTI image ({type(image).__name__})")
    shape = tuple(int(n) for n in image.shape)
    if not shape or any(n <= 0 for n in shape) or float(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
        raise InputError(f"{path}: corrupt NIfTI header (implausible shape {shape})")
    try:
        array = np.asanyarray(image.dataobj, dtype=np.float32)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:
        raise InputError(f"{path}: truncated or corrupt image data ({exc.__class__.__name__})") from exc
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: corrupt NIfTI header (degenerate affine)")
    # the single-file header of the same fields: outputs are written as .nii.gz whatever came in
    header = nib.Nifti1Header.from_header(image.header)
    return array, affine, header


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _read_2d(path: Path) -> np.ndarray:
    """A 2D image file (PNG/JPEG/TIFF/BMP, colour averaged to grey) or a .npy array, as (X, Y) float32.

    Image files are indexed [row, column]; the array is transposed so that X runs along columns,
    as for DICOM, and outputs are written with an identity affine.
    """
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            from skimage import io as skio

            array = skio.imread(path)
            if array.ndim == 3:
                array = array[..., :3].mean(axis=-1)
            array = array.T
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: cannot read image ({exc.__class__.__name__})") from exc
    if not np.issubdtype(np.asarray(array).dtype, np.number):
        raise InputError(f"{path}: not a numeric image")
    return np.asarray(array, dtype=np.float32)


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header | None, tuple[int, ...]]:
    """Read a NIfTI file, a DICOM series folder, one DICOM file or a 2D image/.npy as (X, Y, Z) float32.

    Returns:
        (array (X, Y, Z), affine (4, 4), NIfTI header or None, the input's own spatial shape).

    Raises:
        InputError: missing path, unreadable or corrupt file, not 2D/3D, NaN/Inf voxels.
    """
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        from anomaly_diffusion.data.dicom import read_dicom_series

        volume = read_dicom_series(path)
        array, affine, header = volume.data.astype(np.float32), volume.affine, None
    elif path.suffix.lower() in (*IMAGE_SUFFIXES, ".npy"):
        array, affine, header = _read_2d(path), np.eye(4), None
    elif path.suffix.lower() == ".dcm":
        from anomaly_diffusion.data.dicom import read_dicom_file

        volume = read_dicom_file(path)
        array, affine, header = volume.data.astype(np.float32), volume.affine, None
    else:
        array, affine, header = _read_nifti(path)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 4:
        raise InputError(
            f"{path}: 4D image with {array.shape[3]} volumes; pass one 3D volume per channel "
            "(split it with e.g. fslsplit)"
        )
    if array.ndim not in (2, 3):
        raise InputError(f"{path}: expected a 2D or 3D image, got shape {array.shape}")
    spatial_shape = tuple(int(s) for s in array.shape)
    if array.ndim == 2:
        array = array[..., None]
    if min(array.shape[:2]) < MIN_SIZE:
        raise InputError(f"{path}: image too small ({spatial_shape}); need at least {MIN_SIZE} voxels in-plane")
    finite = np.isfinite(array)
    if not finite.all():
        raise InputError(f"{path}: {int((~finite).sum())} voxels are NaN or Inf")
    return array, affine, header, spatial_shape


def load_scan(paths: Sequence[Path], expected_channels: int | None = None) -> Scan:
    """Read one file per channel (all on the same grid) into a `Scan`.

    Raises:
        InputError: as `read_volume`, plus wrong channel count, channels on different grids, and
            an all-zero/constant scan.
    """
    if not paths:
        raise InputError("no input scan given")
    if expected_channels is not None and len(paths) != expected_channels:
        raise InputError(f"{paths[0]}: the model expects {expected_channels} channel file(s), got {len(paths)}")
    arrays, first = [], None
    for path in paths:
        array, affine, header, spatial_shape = read_volume(path)
        if first is None:
            first = (affine, header, spatial_shape, path)
        elif array.shape != arrays[0].shape or not np.allclose(affine, first[0], atol=1e-3):
            raise InputError(f"{path}: not on the same grid as {first[3]} (shape or affine differ)")
        arrays.append(array)
    assert first is not None
    data = np.stack(arrays)
    if all(float(a.max()) == float(a.min()) for a in arrays):
        raise InputError(f"{paths[0]}: scan is constant (all voxels {float(arrays[0].flat[0])}); nothing to explain")
    return Scan(data=data, affine=first[0], spatial_shape=first[2], header=first[1], sources=tuple(paths))


def read_mask(path: Path, scan: Scan) -> np.ndarray:
    """Read a mask on the scan's grid as bool (X, Y, Z) (voxels > 0)."""
    array, affine, _, _ = read_volume(path)
    if array.shape != scan.data.shape[1:]:
        raise InputError(f"{path}: mask shape {array.shape} differs from image shape {scan.data.shape[1:]}")
    if not np.allclose(affine, scan.affine, atol=1e-3):
        raise InputError(f"{path}: mask affine differs from the image's")
    return array > 0


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse an existing output unless overwrite, and an output folder that cannot be written."""
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create output folder ({exc.strerror})") from exc
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{folder}: output folder is not writable")


def save_like(array: np.ndarray, scan: Scan, path: Path) -> Path:
    """Write a (X, Y, Z) array as float32 NIfTI on the scan's grid, atomically.

    The output has the input's own spatial shape (a 2D input gives a 2D output) and affine; the
    header is the input's (geometry codes kept) with identifying free-text fields cleared.
    """
    out = np.asarray(array, dtype=np.float32).reshape(scan.spatial_shape)
    header = scan.header.copy() if scan.header is not None else nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    image = nib.Nifti1Image(out, scan.affine, header=header)
    image.header["descrip"] = b"anomaly_diffusion output"
    image.header["aux_file"] = b""
    image.header["db_name"] = b""
    if scan.header is None:
        image.set_sform(scan.affine, code=1)
        image.set_qform(scan.affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(image, tmp), suffix=".nii.gz")
