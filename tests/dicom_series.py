"""Writing DICOM series with pydicom for tests: oblique geometry, rescale, shuffled files, patient identifiers."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

SHAPE = (5, 4, 6)  # (X = columns, Y = rows, Z = slices): all different, so a transpose shows
PIXEL_SPACING = ("0.9", "1.3")  # (row spacing along j, column spacing along i)
SLICE_GAP = 2.5
SLOPE, INTERCEPT = 2.0, -10.0
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-778899"
BIRTH_DATE, ACCESSION = "19700101", "ACC20261201X"
IDENTIFIERS = {
    "PatientName": PATIENT_NAME,
    "PatientID": PATIENT_ID,
    "PatientBirthDate": BIRTH_DATE,
    "AccessionNumber": ACCESSION,
    "OtherPatientIDs": "MRN-4455661",
    "ReferringPhysicianName": "Welby^Marcus",
}
"""Identifying header values every test file carries: none of them may reach a log or MLflow."""
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
FRAME_OF_REFERENCE_UID = "1.2.826.0.1.3680043.8.498.7"


def _ds(values: Iterable[float], fmt: str) -> list[str]:
    """DS strings; the parsed floats, not the unrounded ones, are the truth the tests compare to."""
    return [format(float(v), fmt) for v in values]


def _oblique_orientation() -> tuple[np.ndarray, np.ndarray]:
    """Direction cosines along i and along j of a rotation about all three axes, as stored."""
    a, b, c = 0.3, -0.2, 0.5
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    rotation = rz @ ry @ rx
    iop = np.array([float(v) for v in _ds([*rotation[:, 0], *rotation[:, 1]], ".8f")])
    return iop[:3], iop[3:]


def _file(sop_class: UID, series_uid: str, rows: int, cols: int) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE_UID
    ds.Modality = "MR"
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20261201", "101500", "4711"
    ds.SeriesNumber = 7
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    # Type 2 and 2C attributes of the modules every image IOD has (dciodvfy counts a missing one as an
    # error): the writers are judged on a conformant source
    ds.Manufacturer = "ACME"
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "BRAIN"  # an unpaired part: Laterality (Type 2C) is absent, as it should be
    ds.PatientPosition = "HFS"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def _write_slice(
    path: Path, stored: np.ndarray, position: Sequence[str], series_uid: str, instance: int, pixels: bool = True
) -> None:
    """One MR Image Storage file; `stored` is (X, Y) int16, written as pixel_array = stored.T."""
    ds = _file(MRImageStorage, series_uid, rows=stored.shape[1], cols=stored.shape[0])
    along_i, along_j = _oblique_orientation()
    ds.ImageOrientationPatient = _ds([*along_i, *along_j], ".8f")
    ds.ImagePositionPatient = list(position)
    ds.PixelSpacing = list(PIXEL_SPACING)
    ds.SliceThickness = str(SLICE_GAP)
    ds.InstanceNumber = instance
    # the MR Image module's Type 1 and 2 attributes: a plain 2D spin echo
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "15", 1
    ds.RescaleSlope, ds.RescaleIntercept = str(SLOPE), str(INTERCEPT)
    if pixels:
        ds.PixelData = np.ascontiguousarray(stored.T.astype("<i2")).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _positions(n: int, gap: float) -> list[list[str]]:
    """ImagePositionPatient strings of `n` slices, `gap` mm apart along the slice normal."""
    along_i, along_j = _oblique_orientation()
    normal = np.cross(along_i, along_j)
    origin = np.array([-40.25, 12.5, 63.0])
    return [_ds(origin + k * gap * normal, ".6f") for k in range(n)]


def _stored_volume(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return np.random.default_rng(0).integers(-300, 3000, size=shape).astype(np.int16)


def _write_series(
    folder: Path,
    stored: np.ndarray,
    gap: float = SLICE_GAP,
    series_uid: str | None = None,
    skip: Sequence[int] = (),
    seed: int = 1,
) -> list[list[str]]:
    """Write slices of `stored` (X, Y, Z) under shuffled names, in shuffled order, with shuffled
    InstanceNumbers; return every slice's ImagePositionPatient (skipped ones included)."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    positions = _positions(stored.shape[2], gap)
    rng = np.random.default_rng(seed)
    names, instances = rng.permutation(stored.shape[2]), rng.permutation(stored.shape[2]) + 1
    for k in rng.permutation(stored.shape[2]):
        if k not in skip:
            _write_slice(folder / f"IM{names[k]:04d}", stored[:, :, k], positions[k], uid, int(instances[k]))
    return positions


def _write_enhanced(
    path: Path, stored: np.ndarray, file_order: Sequence[int], gap: float = SLICE_GAP
) -> list[list[str]]:
    """One Enhanced MR Image Storage file of `stored` (X, Y, Z) holding slice file_order[f] as frame f;
    geometry and rescale in functional groups. Returns every slice's ImagePositionPatient."""
    positions = _positions(stored.shape[2], gap)
    along_i, along_j = _oblique_orientation()
    ds = _file(EnhancedMRImageStorage, generate_uid(), rows=stored.shape[1], cols=stored.shape[0])
    ds.NumberOfFrames = stored.shape[2]
    shared = Dataset()
    shared.PlaneOrientationSequence = DicomSequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = _ds([*along_i, *along_j], ".8f")
    shared.PixelMeasuresSequence = DicomSequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = list(PIXEL_SPACING)
    shared.PixelMeasuresSequence[0].SliceThickness = str(SLICE_GAP)
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for k in file_order:
        frame = Dataset()
        frame.PlanePositionSequence = DicomSequence([Dataset()])
        frame.PlanePositionSequence[0].ImagePositionPatient = positions[k]
        frame.PixelValueTransformationSequence = DicomSequence([Dataset()])
        frame.PixelValueTransformationSequence[0].RescaleSlope = str(SLOPE)
        frame.PixelValueTransformationSequence[0].RescaleIntercept = str(INTERCEPT)
        frame.PixelValueTransformationSequence[0].RescaleType = "US"
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    frames = np.stack([stored[:, :, k].T for k in file_order]).astype("<i2")
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return positions


DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not installed (apt-get install dicom3tools; .ci/run installs it)"
)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's (error lines, warning lines) about one DICOM file: the standard's reference IOD checker."""
    assert DCIODVFY is not None
    found = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False, timeout=60)
    lines = (found.stdout + found.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]
