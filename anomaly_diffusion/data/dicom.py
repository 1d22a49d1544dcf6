"""Read one DICOM series folder as an (X, Y, Z) float32 volume with a NIfTI-style RAS+ affine.

Geometry follows DICOM PS3.3 C.7.6.2 (Image Plane module): patient coordinates are LPS, the
first ImageOrientationPatient triplet is the direction in which the column index i grows, the
second the direction in which the row index j grows, and PixelSpacing is (row spacing along j,
column spacing along i). Slices are ordered by the projection of ImagePositionPatient on the
slice normal, never by file name or InstanceNumber. The LPS affine is turned into the RAS+
affine nibabel uses for NIfTI by `diag(-1, -1, 1, 1) @ affine`.

Multi-frame (enhanced) files take their geometry and rescale from the per-frame functional
groups, falling back to the shared ones. Only a folder holding a single file may lack geometry;
it then gets the grid an identity-orientation LPS image would have (see `_fallback_affine`),
frames kept in file order, and a `UserWarning` says so.

Error messages name the folder (and a file name where one file is at fault) but never a
patient identifier: no header value other than UIDs, sizes and geometry is ever formatted.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from anomaly_diffusion.errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING_RTOL = 0.01
"""Relative tolerance on the spread of slice spacings."""
SPACING_ATOL_MM = 0.02
"""Absolute slack for positions written with two decimals (each rounded by up to 0.005 mm)."""
DUPLICATE_MM = 1e-3
"""Two slices closer than this along the normal are the same position."""
ORIENTATION_ATOL = 1e-4
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
NO_UID = "<no SeriesInstanceUID>"


IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
)
"""Header attributes whose values identify a patient (or the people and the visit around them)."""
MIN_IDENTIFIER_LENGTH = 3
"""Shorter name parts ('Li', 'Jo') are not redacted: they would blank out unrelated text."""
REDACTED = "[redacted]"


@dataclass(frozen=True, eq=False)
class DicomSource:
    """The instances a DICOM volume was read from, pixel data removed, for outputs that reference them.

    Attributes:
        datasets: the source instances without pixel data, in file-name order.
        slices: for each slice k of the volume (ascending along the normal): (index into
            `datasets`, frame index within that instance).
        geometry: every frame had ImagePositionPatient, ImageOrientationPatient and PixelSpacing
            (False: the volume is on the fallback grid, so nothing can be overlaid on the source).
    """

    datasets: tuple[Dataset, ...] = field(repr=False)
    slices: tuple[tuple[int, int], ...]
    geometry: bool

    def identifiers(self) -> tuple[str, ...]:
        """Every identifying header value (see `IDENTIFYING_KEYWORDS`), whole and by name part, longest first.

        A person name 'Doe^Jane' gives 'Doe^Jane', 'Doe' and 'Jane'; a date '19700101' also
        gives '1970-01-01' and '1970.01.01', the ways a folder name may spell it.
        """
        found: set[str] = set()
        for ds in self.datasets:
            for keyword in IDENTIFYING_KEYWORDS:
                value = ds.get(keyword)
                values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
                for item in values:
                    text = str(item or "").strip()
                    found.update([text, *re.split(r"[\\^=\s,]+", text)])
                    if keyword == "PatientBirthDate" and re.fullmatch(r"\d{8}", text):
                        found.update(f"{text[:4]}{sep}{text[4:6]}{sep}{text[6:]}" for sep in "-._")
        return tuple(sorted((t for t in found if len(t) >= MIN_IDENTIFIER_LENGTH), key=lambda t: (-len(t), t)))


def redact(text: str, identifiers: Sequence[str]) -> str:
    """`text` with every occurrence of each identifier (any case) replaced by '[redacted]'."""
    for identifier in identifiers:  # longest first, so 'Doe^Jane' goes before 'Doe'
        text = re.sub(re.escape(identifier), REDACTED, text, flags=re.IGNORECASE)
    return text


@dataclass(frozen=True)
class DicomVolume:
    """A DICOM series as a NIfTI-ordered volume.

    Attributes:
        data: rescaled intensities, float32, (X, Y, Z): X is the column index i, Y the row
            index j, Z the slice index k (ascending along the slice normal).
        affine: (4, 4) float64, voxel (i, j, k) -> RAS+ world mm, as nibabel uses for NIfTI.
        series_uid: the SeriesInstanceUID (empty if the files have none).
        source: the instances without pixel data and which instance and frame each slice is.
    """

    data: np.ndarray
    affine: np.ndarray
    series_uid: str
    source: DicomSource


@dataclass(frozen=True)
class _Frame:
    """One 2D frame with the geometry its header gives (None where missing)."""

    pixels: np.ndarray  # (rows, cols) = (j, i), float32, rescaled
    position: np.ndarray | None  # (3,) LPS mm, centre of the first transmitted voxel
    orientation: np.ndarray | None  # (6,) direction cosines along i then along j
    pixel_spacing: np.ndarray | None  # (2,) mm: (row spacing along j, column spacing along i)
    slice_step: float | None  # mm: SpacingBetweenSlices, else SliceThickness
    origin: tuple[int, int] = (0, 0)  # (index of its file among the series' files, frame index in that file)


def read_dicom_series(folder: Path) -> DicomVolume:
    """Read every DICOM file of one series in `folder` (not recursive) into a volume.

    Hidden files, non-DICOM files and a DICOMDIR are skipped. Slices are sorted by position
    along the slice normal and must be evenly spaced; a multi-frame file contributes its frames.

    Args:
        folder: a folder holding the files of exactly one series.

    Returns:
        The volume, (X, Y, Z) float32 after RescaleSlope/RescaleIntercept, with its RAS+ affine.

    Raises:
        InputError: not a folder, no DICOM image files, several series, files without pixel
            data, mixed frame sizes or orientations, duplicate or unevenly spaced slices,
            undecodable pixel data.
    """
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of DICOM files")
    return _volume(folder, _read_datasets(folder))


def read_dicom_file(path: Path) -> DicomVolume:
    """Read one DICOM file (a 2D image, e.g. an X-ray, or a multi-frame volume).

    Raises:
        InputError: not a DICOM file, no pixel data, or pixel data that cannot be decoded.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=False, force=False)
    except InvalidDicomError as exc:
        raise InputError(f"{path}: not a DICOM file") from exc
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: cannot read DICOM file ({type(exc).__name__})") from exc
    return _volume(path, [(path, ds)])


def _volume(source: Path, datasets: list[tuple[Path, Dataset]]) -> DicomVolume:
    """The one series among `datasets` as a volume; errors name `source` (a folder or a file)."""
    folder = source
    series = _group_by_series(datasets)
    if not series:
        raise InputError(f"{folder}: no DICOM files found")
    if len(series) > 1:
        raise InputError(f"{folder}: {_describe_series(series)}; pass a folder holding one series")
    (series_uid, files), *_ = series.items()
    _check_pixel_data(folder, files)
    _check_frame_sizes(folder, files)
    frames = [frame for n, (path, ds) in enumerate(files) for frame in _frames(folder, path, ds, n)]
    geometry = all(_has_geometry(frame) for frame in frames)
    if geometry:
        frames, affine = _sorted_with_affine(folder, frames)
    elif len(files) == 1:
        warnings.warn(
            f"{folder}: DICOM geometry missing; using an identity-orientation grid, frames in file order",
            UserWarning,
            stacklevel=2,
        )
        affine = _fallback_affine(frames)
    else:
        missing = sum(not _has_geometry(frame) for frame in frames)
        raise InputError(
            f"{folder}: {missing} of {len(frames)} slices lack ImagePositionPatient, ImageOrientationPatient "
            "or PixelSpacing, so the slices cannot be ordered"
        )
    data = np.stack([frame.pixels.T for frame in frames], axis=-1).astype(np.float32, copy=False)
    series_uid = "" if series_uid == NO_UID else series_uid
    for _, ds in files:  # the pixels now live in `data`; the headers travel on for DICOM outputs
        for keyword in PIXEL_KEYWORDS:
            if keyword in ds:
                delattr(ds, keyword)
    headers = DicomSource(tuple(ds for _, ds in files), tuple(frame.origin for frame in frames), geometry)
    return DicomVolume(data=data, affine=affine, series_uid=series_uid, source=headers)


def _read_datasets(folder: Path) -> list[tuple[Path, Dataset]]:
    """Every visible DICOM file in `folder` (sorted by name only for reproducible messages)."""
    datasets: list[tuple[Path, Dataset]] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False, force=False)
        except InvalidDicomError:
            continue
        except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
            # The exception text may quote header values, so only its class is reported.
            raise InputError(f"{folder}: cannot read DICOM file {path.name} ({type(exc).__name__})") from exc
        if path.name.upper() == "DICOMDIR" or str(ds.get("SOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
            continue
        datasets.append((path, ds))
    return datasets


def _group_by_series(datasets: Sequence[tuple[Path, Dataset]]) -> dict[str, list[tuple[Path, Dataset]]]:
    """Files keyed by SeriesInstanceUID, in first-seen order."""
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in datasets:
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip() or NO_UID
        series.setdefault(uid, []).append((path, ds))
    return series


def _describe_series(series: dict[str, list[tuple[Path, Dataset]]]) -> str:
    """'found 2 DICOM series: UID (n files), ...' on one line, largest series first."""
    counts = sorted(((len(files), uid) for uid, files in series.items()), key=lambda c: (-c[0], c[1]))
    listed = ", ".join(f"{uid} ({n} file{'s' if n != 1 else ''})" for n, uid in counts)
    return f"found {len(series)} DICOM series: {listed}"


def _has_pixels(ds: Dataset) -> bool:
    return any(keyword in ds for keyword in PIXEL_KEYWORDS)


def _check_pixel_data(folder: Path, files: Sequence[tuple[Path, Dataset]]) -> None:
    """Raise unless every file carries pixel data."""
    without = [path.name for path, ds in files if not _has_pixels(ds)]
    if without:
        raise InputError(
            f"{folder}: {len(without)} of {len(files)} DICOM files have no pixel data (e.g. {without[0]}); "
            "pass a folder of image files"
        )


def _check_frame_sizes(folder: Path, files: Sequence[tuple[Path, Dataset]]) -> None:
    """Raise unless all files are single-channel and share Rows x Columns."""
    colour = [path.name for path, ds in files if int(ds.get("SamplesPerPixel", 1) or 1) != 1]
    if colour:
        raise InputError(f"{folder}: colour DICOM images are not supported (e.g. {colour[0]})")
    sizes = sorted({(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for _, ds in files})
    if len(sizes) > 1:
        listed = ", ".join(f"{rows}x{cols}" for rows, cols in sizes)
        raise InputError(f"{folder}: slices have different sizes (Rows x Columns: {listed})")


def _number_of_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames", 1)
    return max(int(value), 1) if value not in (None, "") else 1


def _functional_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """The first item of functional group `keyword` for `frame`: per-frame first, then shared."""
    for groups_keyword, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_keyword)
        if groups is None or len(groups) <= index:
            continue
        sequence = groups[index].get(keyword)
        if sequence:
            return sequence[0]
    return None


def _attribute(ds: Dataset, frame: int, group: str, keyword: str, top_level: bool) -> object | None:
    """An attribute from functional group `group` of `frame`, else (if `top_level`) from the dataset."""
    item = _functional_item(ds, frame, group)
    if item is not None and item.get(keyword) not in (None, ""):
        return item.get(keyword)
    if top_level and ds.get(keyword) not in (None, ""):
        return ds.get(keyword)
    return None


def _floats(value: object | None, size: int) -> np.ndarray | None:
    """`value` as a float64 vector of length `size`, or None if missing or malformed."""
    if value is None:
        return None
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return array if array.shape == (size,) and np.all(np.isfinite(array)) else None


def _scalar(value: object | None) -> float | None:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if np.isfinite(result) else None


def _decode(folder: Path, path: Path, ds: Dataset, n_frames: int) -> np.ndarray:
    """Pixel data as (frames, rows, cols)."""
    try:
        pixels = np.asarray(ds.pixel_array)
    except (RuntimeError, NotImplementedError, ValueError, AttributeError, KeyError) as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        raise InputError(f"{folder}: cannot decode pixel data of {path.name} ({name}, {type(exc).__name__})") from exc
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.ndim != 3 or pixels.shape[0] != n_frames:
        raise InputError(f"{folder}: {path.name} has pixel data of shape {pixels.shape} for {n_frames} frame(s)")
    return pixels


def _frames(folder: Path, path: Path, ds: Dataset, file_index: int = 0) -> list[_Frame]:
    """The frames of one file (the `file_index`-th of its series), rescaled, with the geometry of each."""
    n_frames = _number_of_frames(ds)
    pixels = _decode(folder, path, ds, n_frames)
    # A multi-frame file's top-level ImagePositionPatient (if any) is not per frame.
    single = n_frames == 1
    frames = []
    for index in range(n_frames):
        slope = _scalar(_attribute(ds, index, "PixelValueTransformationSequence", "RescaleSlope", True))
        intercept = _scalar(_attribute(ds, index, "PixelValueTransformationSequence", "RescaleIntercept", True))
        rescaled = pixels[index].astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)
        step = _scalar(_attribute(ds, index, "PixelMeasuresSequence", "SpacingBetweenSlices", True))
        thickness = _scalar(_attribute(ds, index, "PixelMeasuresSequence", "SliceThickness", True))
        frames.append(
            _Frame(
                pixels=rescaled.astype(np.float32),
                position=_floats(_attribute(ds, index, "PlanePositionSequence", "ImagePositionPatient", single), 3),
                orientation=_floats(
                    _attribute(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient", True), 6
                ),
                pixel_spacing=_floats(_attribute(ds, index, "PixelMeasuresSequence", "PixelSpacing", True), 2),
                slice_step=abs(step) if step else (abs(thickness) if thickness else None),
                origin=(file_index, index),
            )
        )
    return frames


def _has_geometry(frame: _Frame) -> bool:
    return frame.position is not None and frame.orientation is not None and frame.pixel_spacing is not None


def _present(value: np.ndarray | None) -> np.ndarray:
    """`value`, which the caller has checked is there (see `_has_geometry`)."""
    assert value is not None
    return value


def _sorted_with_affine(folder: Path, frames: Sequence[_Frame]) -> tuple[list[_Frame], np.ndarray]:
    """Frames sorted along the slice normal, and the RAS+ affine of the sorted stack.

    The LPS affine has columns along_i * PixelSpacing[1], along_j * PixelSpacing[0], the mean
    slice step (position[last] - position[0]) / (n - 1) (normal * slice step for one slice),
    and the first sorted slice's ImagePositionPatient as origin.
    """
    orientations = np.stack([_present(f.orientation) for f in frames])
    spacings = np.stack([_present(f.pixel_spacing) for f in frames])
    if not np.allclose(orientations, orientations[0], rtol=0.0, atol=ORIENTATION_ATOL):
        raise InputError(f"{folder}: slices have different ImageOrientationPatient; pass one stack")
    if not np.allclose(spacings, spacings[0], rtol=1e-3, atol=0.0):
        raise InputError(f"{folder}: slices have different PixelSpacing; pass one stack")
    along_i, along_j = orientations[0][:3], orientations[0][3:]
    normal = np.cross(along_i, along_j)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise InputError(f"{folder}: ImageOrientationPatient is not two orthogonal unit vectors")
    positions = np.stack([_present(f.position) for f in frames])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    _check_spacing(folder, positions @ normal)
    if len(frames) > 1:
        step = (positions[-1] - positions[0]) / (len(frames) - 1)
        _check_collinear(folder, positions, step)
    else:
        step = normal * (frames[0].slice_step or 1.0)
    row_spacing, column_spacing = spacings[0]
    lps = np.eye(4)
    lps[:3, 0] = along_i * column_spacing
    lps[:3, 1] = along_j * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return [frames[i] for i in order], LPS_TO_RAS @ lps


def _check_spacing(folder: Path, offsets: np.ndarray) -> None:
    """Raise if sorted slice offsets (mm along the normal) repeat or are unevenly spaced."""
    if offsets.size < 2:
        return
    gaps = np.diff(offsets)
    duplicates = int(np.sum(gaps < DUPLICATE_MM))
    if duplicates:
        raise InputError(
            f"{folder}: {duplicates} slice(s) repeat another slice's position (several echoes, time points "
            "or copies?); pass one 3D stack"
        )
    low, high = float(gaps.min()), float(gaps.max())
    if high - low > SPACING_RTOL * high + SPACING_ATOL_MM:
        raise InputError(
            f"{folder}: uneven slice spacing (min {low:.4g} mm, max {high:.4g} mm); a slice may be missing"
        )


def _check_collinear(folder: Path, positions: np.ndarray, step: np.ndarray) -> None:
    """Raise if sorted positions stray from position[0] + k * step (e.g. two stacks mixed)."""
    expected = positions[0] + np.arange(len(positions))[:, np.newaxis] * step
    stray = float(np.max(np.linalg.norm(positions - expected, axis=1)))
    if stray > SPACING_RTOL * float(np.linalg.norm(step)) + SPACING_ATOL_MM:
        raise InputError(f"{folder}: slice positions are not on one line (off by up to {stray:.4g} mm)")


def _fallback_affine(frames: Sequence[_Frame]) -> np.ndarray:
    """RAS+ affine of a grid with identity LPS direction cosines and origin 0, as ITK assumes.

    Spacing comes from the first PixelSpacing and SpacingBetweenSlices/SliceThickness found,
    else 1 mm, so the result is diag(-column spacing, -row spacing, slice step, 1).
    """
    pixel_spacing = next((f.pixel_spacing for f in frames if f.pixel_spacing is not None), np.ones(2))
    slice_step = next((f.slice_step for f in frames if f.slice_step), 1.0)
    lps = np.diag([float(pixel_spacing[1]), float(pixel_spacing[0]), float(slice_step), 1.0])
    return LPS_TO_RAS @ lps
