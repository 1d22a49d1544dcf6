"""Reading scans (NIfTI, NRRD, MetaImage, DICOM, 2D images) and writing outputs in the input's space.

A `Scan` carries its geometry (affine, the input's own spatial shape and NIfTI header, and for
DICOM the source headers), so every output is written on exactly the input's voxel grid. Errors
are one line naming the file.

Formats: NIfTI-1/2 single files (.nii, .nii.gz) and pairs (.hdr + .img) with nibabel; NRRD
(.nrrd, .nhdr) with pynrrd (the library MONAI's NrrdReader wraps; read directly because that
wrapper raises KeyError on headers without `space directions` and passes non-LPS spaces through
unconverted); MetaImage (.mha, .mhd) with metaimageio (pure Python and numpy: MONAI reads
MetaImage only through ITK, a large dependency); DICOM with pydicom (`dicom.py`); PNG, JPEG,
TIFF, BMP and .npy as 2D images.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from anomaly_diffusion.errors import InputError, OutputError
from anomaly_diffusion.files import atomic_write

if TYPE_CHECKING:
    from anomaly_diffusion.data.dicom import DicomSource

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class InputKind:
    """What kind of input a scan is, to compare with what a model was trained on.

    Attributes:
        volume: several slices (a 3D scan); False: one 2D image or slice.
        colour: read from a colour image whose channels differ (they are averaged to grey).
    """

    volume: bool
    colour: bool = False

    def describe(self) -> str:
        if self.volume:
            return "3D volume"
        return "2D colour image" if self.colour else "2D image"


@dataclass(frozen=True)
class Scan:
    """A scan as (C, X, Y, Z) float32 with its geometry.

    Attributes:
        data: intensities, (C, X, Y, Z); a 2D input has Z = 1.
        affine: voxel -> world (RAS+ mm), (4, 4).
        spatial_shape: the input file's own spatial shape, (X, Y) or (X, Y, Z), for outputs.
        header: the first input's NIfTI header (None for DICOM), the template for outputs.
        sources: the input paths, one per channel.
        dicom: per channel, the DICOM source headers (None for a channel read from another
            format); empty when no channel is DICOM.
        colour: the input was a colour image (averaged to grey).
        picture: the input was a picture file (PNG, JPEG, TIFF, BMP, .npy): no geometry, no units, not
            a scan; False for the scan formats (NIfTI, NRRD, MetaImage, DICOM).
    """

    data: np.ndarray
    affine: np.ndarray
    spatial_shape: tuple[int, ...]
    header: nib.Nifti1Header | None
    sources: tuple[Path, ...]
    dicom: tuple[DicomSource | None, ...] = ()
    colour: bool = False
    picture: bool = False

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def kind(self) -> InputKind:
        return InputKind(volume=self.data.shape[-1] > 1, colour=self.colour)

    def identifiers(self) -> tuple[str, ...]:
        """The patient identifiers of its DICOM headers (none for other formats), longest first."""
        found = {text for source in self.dicom if source is not None for text in source.identifiers()}
        return tuple(sorted(found, key=lambda t: (-len(t), t)))


@dataclass(frozen=True)
class Volume:
    """One input file read: (X, Y, Z) float32 and what `Scan` keeps of it."""

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None
    spatial_shape: tuple[int, ...]
    dicom: DicomSource | None = None
    colour: bool = False
    picture: bool = False


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
NRRD_SUFFIXES = (".nrrd", ".nhdr")
METAIMAGE_SUFFIXES = (".mha", ".mhd")
NRRD_SPACES = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}
"""NRRD `space` values with a patient orientation, as the sign flips that take them to RAS+."""


def _read_2d(path: Path) -> tuple[np.ndarray, bool]:
    """A 2D image file (PNG/JPEG/TIFF/BMP, colour averaged to grey) or a .npy array, as (X, Y) float32.

    Image files are indexed [row, column]; the array is transposed so that X runs along columns,
    as for DICOM, and outputs are written with an identity affine. An alpha channel is dropped.

    Returns:
        (array (X, Y), whether the image had colour: channels that differ somewhere).
    """
    colour = False
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            from skimage import io as skio

            array = skio.imread(path)
            if array.ndim == 3 and array.shape[-1] in (2, 4):
                array = array[..., :-1]  # grey+alpha or RGB+alpha
            if array.ndim == 3 and array.shape[-1] in (1, 3):
                colour = bool(np.any(array != array[..., :1]))
                array = array.mean(axis=-1)
            array = array.T
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: cannot read image ({exc.__class__.__name__})") from exc
    if not np.issubdtype(np.asarray(array).dtype, np.number):
        raise InputError(f"{path}: not a numeric image")
    return np.asarray(array, dtype=np.float32), colour


def _checked_affine(path: Path, affine: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: corrupt {what} header (degenerate geometry)")
    return affine


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NRRD file (.nrrd, or a detached .nhdr) as (array (X, Y[, Z]), RAS+ affine).

    `space directions` give the columns of the affine and `space origin` its translation, in
    the header's `space`, turned to RAS+; a header without them (only `spacings`) gets identity
    LPS directions and origin 0, as ITK and Slicer read it. A `space` without a patient
    orientation (scanner-xyz, 3D-right-handed) is refused rather than guessed.
    """
    import nrrd

    try:
        array, header = nrrd.read(str(path))
    except Exception as exc:  # pynrrd raises NRRDError, ValueError, OSError, zlib errors...
        raise InputError(f"{path}: corrupt or unreadable NRRD file ({exc.__class__.__name__})") from exc
    directions = header.get("space directions")
    spatial = list(range(array.ndim))
    if directions is not None:
        directions = np.asarray(directions, dtype=np.float64)
        spatial = [axis for axis in range(array.ndim) if np.isfinite(directions[axis]).all()]
    extra = [axis for axis in range(array.ndim) if axis not in spatial and array.shape[axis] > 1]
    if extra:
        raise InputError(
            f"{path}: NRRD with {array.shape[extra[0]]} values per voxel (kinds {header.get('kinds')}); "
            "pass one scalar volume per channel"
        )
    array = array.reshape([array.shape[axis] for axis in spatial])
    n = len(spatial)
    if n not in (2, 3):
        raise InputError(f"{path}: expected a 2D or 3D image, got shape {array.shape}")
    space = str(header.get("space", "left-posterior-superior")).lower()
    if directions is None:
        spacings = np.asarray(header.get("spacings", np.ones(n)), dtype=np.float64)[spatial]
        linear = np.diag(np.where(np.isfinite(spacings), spacings, 1.0))
        origin, flips = np.zeros(n), NRRD_SPACES["lps"]
    elif space not in NRRD_SPACES:
        raise InputError(f"{path}: NRRD space {space!r} has no patient orientation; resave it in RAS or LPS")
    else:
        linear = directions[spatial].T  # column a: the world step of index a
        origin = np.asarray(header.get("space origin", np.zeros(linear.shape[0])), dtype=np.float64)
        flips = NRRD_SPACES[space]
    affine = np.eye(4)
    affine[: linear.shape[0], :n] = linear
    affine[: origin.shape[0], 3] = origin
    if n == 2:  # a 2D image: the third column is the unit normal of its plane
        normal = np.cross(affine[:3, 0], affine[:3, 1])
        affine[:3, 2] = normal / max(float(np.linalg.norm(normal)), 1e-12)
    return array, _checked_affine(path, np.diag([*flips, 1.0]) @ affine, "NRRD")


def _read_metaimage(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A MetaImage file (.mha, or .mhd with its raw data file) as (array (X, Y[, Z]), RAS+ affine).

    Physical space is LPS, as ITK writes and reads it (AnatomicalOrientation is informational
    there too): the affine is TransformMatrix @ diag(ElementSpacing) with Offset as origin.
    """
    import metaimageio

    try:
        array, meta = metaimageio.read(path)
    except Exception as exc:  # a malformed header raises ValueError, KeyError, TypeError, OSError...
        raise InputError(f"{path}: corrupt or unreadable MetaImage file ({exc.__class__.__name__})") from exc
    channels = int(meta.get("ElementNumberOfChannels") or 1)
    if channels > 1:
        raise InputError(f"{path}: MetaImage with {channels} values per voxel; pass one scalar volume per channel")
    n = int(meta.get("NDims") or array.ndim)
    if n not in (2, 3) or array.ndim != n:
        raise InputError(f"{path}: expected a 2D or 3D image, got shape {array.shape}")
    array = np.asarray(array).transpose()  # metaimageio gives [z, y, x]
    spacing = np.asarray(meta.get("ElementSpacing", np.ones(n)), dtype=np.float64)
    direction = next((meta[k] for k in ("TransformMatrix", "Rotation", "Orientation") if k in meta), np.eye(3))
    origin = next((meta[k] for k in ("Offset", "Position", "Origin") if k in meta), np.zeros(n))
    lps = np.eye(4)
    lps[:n, :n] = np.asarray(direction, dtype=np.float64)[:n, :n] @ np.diag(spacing[:n])
    lps[:n, 3] = np.asarray(origin, dtype=np.float64)[:n]
    return array, _checked_affine(path, LPS_TO_RAS @ lps, "MetaImage")


def read_volume(path: Path) -> Volume:
    """Read a NIfTI, NRRD or MetaImage file, a DICOM series folder, one DICOM file or a 2D image/.npy.

    Returns:
        The volume: (X, Y, Z) float32, its affine (4, 4), NIfTI header (None for other formats),
        the input's own spatial shape, the DICOM source headers (DICOM only) and whether it was
        a colour image.

    Raises:
        InputError: missing path, unreadable or corrupt file, not 2D/3D, NaN/Inf voxels.
    """
    if not path.exists():
        raise InputError(f"{path}: file not found")
    suffix, header, source, colour = path.suffix.lower(), None, None, False
    picture = suffix in (*IMAGE_SUFFIXES, ".npy")
    if path.is_dir() or suffix == ".dcm":
        from anomaly_diffusion.data.dicom import read_dicom_file, read_dicom_series

        volume = read_dicom_series(path) if path.is_dir() else read_dicom_file(path)
        array, affine, source = volume.data.astype(np.float32), volume.affine, volume.source
    elif picture:
        (array, colour), affine = _read_2d(path), np.eye(4)
    elif suffix in NRRD_SUFFIXES:
        array, affine = _read_nrrd(path)
    elif suffix in METAIMAGE_SUFFIXES:
        array, affine = _read_metaimage(path)
    else:
        array, affine, header = _read_nifti(path)
    array = np.asarray(array, dtype=np.float32)
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
    return Volume(array, affine, header, spatial_shape, source, colour, picture)


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
    volumes = [read_volume(path) for path in paths]
    first = volumes[0]
    for path, volume in zip(paths[1:], volumes[1:], strict=True):
        if volume.array.shape != first.array.shape or not np.allclose(volume.affine, first.affine, atol=1e-3):
            raise InputError(f"{path}: not on the same grid as {paths[0]} (shape or affine differ)")
    arrays = [volume.array for volume in volumes]
    if all(float(a.max()) == float(a.min()) for a in arrays):
        raise InputError(f"{paths[0]}: scan is constant (all voxels {float(arrays[0].flat[0])}); nothing to explain")
    dicom = tuple(volume.dicom for volume in volumes) if any(v.dicom is not None for v in volumes) else ()
    return Scan(
        data=np.stack(arrays),
        affine=first.affine,
        spatial_shape=first.spatial_shape,
        header=first.header,
        sources=tuple(paths),
        dicom=dicom,
        colour=any(volume.colour for volume in volumes),
        picture=any(volume.picture for volume in volumes),
    )


def trained_on(kinds: Iterable[InputKind]) -> list[dict[str, bool]]:
    """The distinct kinds of input a model was trained on, as the bundle records them (`extra['trained_on']`)."""
    return [{"volume": k.volume, "colour": k.colour} for k in sorted(set(kinds), key=lambda k: (k.volume, k.colour))]


def check_input_kind(scan: Scan, record: object) -> None:
    """Refuse a scan unlike every input the model was trained on (`trained_on`'s record).

    A 2D image for a model of 3D volumes (or the reverse) is refused, and so is a colour image
    for a model trained on grey ones. What decides is what the input is, not its slice count: a scan
    file (NIfTI, NRRD, MetaImage, DICOM) of one slice, or a 2D NIfTI, is one slice of a scan, which a
    model of volumes explains as it explains each slice of a volume; a picture file (PNG, JPEG, ...)
    is not a scan. Bundles saved before the record existed accept any scan.

    Raises:
        InputError: one line naming the input, what it is and what the model was trained on.
    """
    if not isinstance(record, list) or not record:
        return
    kinds = [InputKind(bool(k.get("volume")), bool(k.get("colour"))) for k in record if isinstance(k, dict)]
    kind = scan.kind
    shape = "x".join(str(n) for n in scan.spatial_shape)
    one_slice_scan = not kind.volume and not scan.picture
    if not any(k.volume == kind.volume or (one_slice_scan and k.volume) for k in kinds):
        trained = " and ".join(sorted({f"{k.describe()}s" for k in kinds}))
        raise InputError(
            f"{scan.sources[0]}: a {kind.describe()} ({shape}), but the model was trained on {trained}; "
            "explain an input like those it learnt from"
        )
    if kind.colour and not any(k.colour for k in kinds):
        raise InputError(
            f"{scan.sources[0]}: a colour image ({shape}), but the model was trained on greyscale images; "
            "convert it to greyscale first if that is what it shows"
        )


def read_mask(path: Path, scan: Scan) -> np.ndarray:
    """Read a mask on the scan's grid as bool (X, Y, Z) (voxels > 0)."""
    volume = read_volume(path)
    if volume.array.shape != scan.data.shape[1:]:
        raise InputError(f"{path}: mask shape {volume.array.shape} differs from image shape {scan.data.shape[1:]}")
    if not np.allclose(volume.affine, scan.affine, atol=1e-3):
        raise InputError(f"{path}: mask affine differs from the image's")
    return volume.array > 0


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
