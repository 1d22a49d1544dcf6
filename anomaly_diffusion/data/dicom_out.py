"""DICOM outputs of a DICOM input: objects a PACS or viewer overlays on the source series.

For a series read by `dicom.py` (the volume is on the source's own voxel grid, slice k being
`DicomSource.slices[k]`), `explain` writes:

- the anomaly map as a Parametric Map (highdicom), one float32 frame per source slice: exact
  values (no integer rescale), the real-world value mapping says they are unit-less anomaly
  scores; 3D Slicer (QuantitativeReporting), OHIF and dcmqi-based tools overlay it on the source;
- the thresholded map as a binary Segmentation (highdicom), one segment 'anomaly', the object
  most viewers overlay without plug-ins (OHIF, Weasis, Slicer);
- the healthy counterfactual as a derived image series of the source's own SOP class (e.g. MR
  Image Storage), one instance per source slice, so every viewer and PACS that shows the source
  shows it the same way, side by side, with the source's window presets. A multi-frame
  (enhanced) source gets a Parametric Map in the source's intensity units instead.

Every object shares the source's FrameOfReferenceUID, StudyInstanceUID and patient/study
attributes (copied into these files only, never into logs), has new Series and SOP Instance UIDs,
and each frame or instance carries the source slice's ImagePositionPatient,
ImageOrientationPatient and PixelSpacing and references the source instance it came from.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from anomaly_diffusion import __version__
from anomaly_diffusion.data.dicom import DicomSource
from anomaly_diffusion.data.io import Scan
from anomaly_diffusion.files import atomic_write, atomic_write_folder

if TYPE_CHECKING:  # highdicom takes 0.4 s to import: only explain runs on DICOM inputs pay it
    import highdicom as hd

MANUFACTURER = "anomaly_diffusion"
MODEL_NAME = "adiff explain"
SERIES_OFFSETS = {"anomaly_map": 1000, "anomaly_seg": 2000, "healthy": 3000}
"""Series numbers of the outputs: the source's plus these, so a viewer lists them after it."""
TYPE2_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
"""Type 2 attributes highdicom copies from the source: present (maybe empty) in a valid source."""
DROPPED_KEYWORDS = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "ModalityLUTSequence",
    "IconImageSequence",
    "SourceImageSequence",
    "DerivationCodeSequence",
)
"""Attributes of a source instance that describe its stored pixels or derivation, not the counterfactual's."""
SERIES_TYPE2 = ("Manufacturer", "PositionReferenceIndicator")
"""Type 2 attributes of the General Equipment and Frame of Reference modules every derived instance has."""
MODALITY_TYPE2 = {
    "MR": ("ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime", "EchoTrainLength", "PatientPosition"),
    "CT": ("KVP", "AcquisitionNumber", "PatientPosition"),
}
"""Type 2 (and 2C whose condition a derived image of one modality always meets, e.g. RepetitionTime unless
echo planar *and* segmented k-space; PatientPosition without a PatientOrientationCodeSequence) attributes of
the modality's image module: present, empty where the source lacks them (empty means unknown)."""
UNPAIRED = frozenset(
    {"BRAIN", "HEAD", "SKULL", "HEADNECK", "NECK", "CHEST", "THORAX", "HEART", "ABDOMEN", "LIVER", "PELVIS"}
    | {"SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "WHOLEBODY"}
)
"""BodyPartExamined values of unpaired parts, whose Laterality is absent, not empty (dciodvfy warns on an empty one)."""
INT16 = np.iinfo(np.int16)


@dataclass(frozen=True)
class DicomPlan:
    """Where the DICOM outputs go, or why there are none.

    Attributes:
        paths: output key -> file or folder ('anomaly_map_dicom', 'anomaly_seg_dicom',
            'healthy_dicom' / 'healthy_{c}_dicom'); empty when nothing can be written.
        note: why a DICOM input gets no DICOM outputs (None when it does or is not DICOM).
    """

    paths: dict[str, Path]
    note: str | None = None


def _unusable(source: DicomSource) -> str | None:
    """Why outputs cannot be overlaid on this source, or None."""
    if not source.geometry:
        return "the series lacks slice geometry"
    if any(not str(ds.get("FrameOfReferenceUID", "") or "") for ds in source.datasets):
        return "the series has no FrameOfReferenceUID"
    if any(not str(ds.get("StudyInstanceUID", "") or "") for ds in source.datasets):
        return "the series has no StudyInstanceUID"
    if len(source.datasets) > 1 and any(_multiframe(ds) for ds in source.datasets):
        return "the series spreads its slices over several multi-frame files"
    return None


def _multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def plan_dicom_outputs(scan: Scan, out_dir: Path, stems: Sequence[str]) -> DicomPlan:
    """The DICOM output paths of a scan read from DICOM (`stems`: the output stem of each channel)."""
    if not scan.dicom:
        return DicomPlan({})
    reasons = {c: _unusable(source) if source is not None else "not DICOM" for c, source in enumerate(scan.dicom)}
    usable = [c for c, reason in reasons.items() if reason is None]
    if not usable:
        return DicomPlan({}, f"no DICOM outputs: {reasons[0]}")
    first = usable[0]
    paths = {
        "anomaly_map_dicom": out_dir / f"{stems[first]}_anomaly_map.dcm",
        "anomaly_seg_dicom": out_dir / f"{stems[first]}_anomaly_seg.dcm",
    }
    for c in usable:
        key = f"healthy_{c}_dicom" if c else "healthy_dicom"
        source = scan.dicom[c]
        assert source is not None
        name = f"{stems[c]}_healthy.dcm" if _multiframe(source.datasets[0]) else f"{stems[c]}_healthy_dcm"
        paths[key] = out_dir / name
    return DicomPlan(paths)


def write_dicom_outputs(
    scan: Scan, anomaly_map: np.ndarray, healthy: np.ndarray, threshold: float, plan: DicomPlan
) -> None:
    """Write the planned DICOM outputs, each atomically.

    Args:
        scan: the DICOM input (`Scan.dicom` set).
        anomaly_map: (X, Y, Z) on the scan's grid.
        healthy: (C, X, Y, Z) counterfactual in the input's intensity units.
        threshold: anomaly score above which a voxel is in the Segmentation.
        plan: `plan_dicom_outputs`'s paths.
    """
    if not plan.paths:
        return
    sources = [(c, s) for c, s in enumerate(scan.dicom) if s is not None and _unusable(s) is None]
    _, reference = sources[0]
    map_path, seg_path = plan.paths["anomaly_map_dicom"], plan.paths["anomaly_seg_dicom"]
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32).reshape(scan.data.shape[1:])
    parametric = parametric_map(
        reference, anomaly_map, "ANOMALY", "adiff anomaly score (residual |x - x_healthy|)", "adiff anomaly map"
    )
    _save(parametric, map_path)
    _save(segmentation(reference, anomaly_map > threshold, threshold), seg_path)
    for c, source in sources:
        path = plan.paths[f"healthy_{c}_dicom" if c else "healthy_dicom"]
        volume = np.asarray(healthy[c], dtype=np.float32).reshape(scan.data.shape[1:])
        if _multiframe(source.datasets[0]):
            explanation = "adiff healthy counterfactual, source intensity units"
            _save(parametric_map(source, volume, "HEALTHY", explanation, "adiff healthy counterfactual"), path)
        else:
            atomic_write_folder(path, partial(write_derived_series, source, volume))


def _save(ds: Dataset, path: Path) -> None:
    atomic_write(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True), suffix=".dcm")


def _frames(source: DicomSource, volume: np.ndarray) -> tuple[list[Dataset], np.ndarray]:
    """highdicom's source images and the volume's slices as (frames, rows, cols) in their order.

    Single-frame sources: one source image per slice, in slice order. One multi-frame source:
    frames in the file's frame order (highdicom takes frame f's geometry from the source's f).
    """
    images = [_complete(ds) for ds in source.datasets]
    if _multiframe(source.datasets[0]):
        frames = np.empty((len(source.slices), volume.shape[1], volume.shape[0]), dtype=volume.dtype)
        for k, (_, frame) in enumerate(source.slices):
            frames[frame] = volume[:, :, k].T
        return images, frames
    order = [images[i] for i, _ in source.slices]
    return order, np.ascontiguousarray(volume.transpose(2, 1, 0))


def _complete(ds: Dataset) -> Dataset:
    """The source instance, or a copy with the type 2 study attributes highdicom reads added empty."""
    missing = [keyword for keyword in TYPE2_STUDY_KEYWORDS if keyword not in ds]
    if not missing:
        return ds  # highdicom only reads its sources
    ds = _copy(ds)
    for keyword in missing:
        setattr(ds, keyword, "")
    return ds


def _copy(ds: Dataset) -> Dataset:
    """A copy of the top-level elements: setting or deleting one leaves `ds` alone (a deep copy costs
    ~0.1 s per instance; nested sequences are shared, and replaced rather than edited here)."""
    return Dataset({tag: copy.copy(element) for tag, element in ds.items()})


def _series_number(source: DicomSource, output: str) -> int:
    try:
        base = int(source.datasets[0].get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        base = 0
    return base + SERIES_OFFSETS[output]


def _window(volume: np.ndarray) -> hd.VOILUTTransformation:
    """A window over the volume's whole range. LINEAR_EXACT maps [center - width/2, center + width/2] onto the
    display range exactly; the default LINEAR's off-by-one terms assume integer pixels and forbid a width
    below 1, and anomaly scores are real numbers in [0, 1] (a width of 0.3 is typical)."""
    import highdicom as hd

    low, high = float(volume.min()), float(volume.max())
    width = max(high - low, 1e-6)
    return hd.VOILUTTransformation(
        window_center=low + width / 2,
        window_width=width,
        window_explanation="full range",
        voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,
    )


def _laterality(ds: Dataset, source: Dataset) -> None:
    """Set the General Series module's Laterality (Type 2C: required for a paired body part) as the
    source's; where the source has none, empty (unknown) unless its BodyPartExamined is unpaired.

    A Segmentation is left to highdicom (it copies BodyPartExamined): dciodvfy counts any Laterality in a
    SEG as an error.
    """
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in source and keyword not in ds:
            setattr(ds, keyword, source[keyword].value)
    if "Laterality" not in ds and str(ds.get("BodyPartExamined", "") or "").upper() not in UNPAIRED:
        ds.Laterality = ""


def _fill_type2(ds: Dataset) -> None:
    """Add the Type 2 attributes a derived instance of a sparse source would lack, empty (unknown)."""
    modality = str(ds.get("Modality", "") or "")
    for keyword in (*TYPE2_STUDY_KEYWORDS, *SERIES_TYPE2, *MODALITY_TYPE2.get(modality, ())):
        if keyword not in ds and not (keyword == "PatientPosition" and "PatientOrientationCodeSequence" in ds):
            setattr(ds, keyword, None)


def parametric_map(
    source: DicomSource, volume: np.ndarray, label: str, explanation: str, description: str
) -> hd.pm.ParametricMap:
    """A float32 Parametric Map of `volume` (X, Y, Z) on `source`'s grid, one frame per slice."""
    import highdicom as hd

    images, frames = _frames(source, volume)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label,
        lut_explanation=explanation,
        unit=codes.UCUM.NoUnits,
        value_range=(float(frames.min()), float(frames.max())),
        slope=1.0,
        intercept=0.0,
    )
    output = "anomaly_map" if label == "ANOMALY" else "healthy"
    pm = hd.pm.ParametricMap(
        source_images=images,
        pixel_array=frames.astype(np.float32),
        **_new_series(source, output),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[_window(frames)],
        content_description=description,
        content_label=label,
        series_description=description,
    )
    _laterality(pm, source.datasets[0])
    return pm


def _new_series(source: DicomSource, output: str) -> dict[str, Any]:
    """The highdicom arguments every derived object shares: a new series and instance, and who made it."""
    import highdicom as hd

    return {
        "series_instance_uid": hd.UID(),
        "series_number": _series_number(source, output),
        "sop_instance_uid": hd.UID(),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": __version__,
        "device_serial_number": "0",
    }


def segmentation(source: DicomSource, mask: np.ndarray, threshold: float) -> hd.seg.Segmentation:
    """A binary Segmentation of `mask` (X, Y, Z) on `source`'s grid: one segment, every frame kept."""
    import highdicom as hd

    images, frames = _frames(source, mask)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="anomaly",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="adiff", version=__version__, family=codes.cid7162.ArtificialIntelligence
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=images,
        pixel_array=frames.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        **_new_series(source, "anomaly_seg"),
        omit_empty_frames=False,  # one frame per source slice, empty or not
        content_description=f"adiff anomaly score above {threshold:.4g}"[:64],
        series_description="adiff anomaly segmentation",
    )
    return seg


def rescale_for(volume: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) that spread the volume's range over int16: value = stored * slope + intercept.

    The encoding error is at most slope / 2 = (max - min) / 131070 (plus float32 rounding where read
    back as float32).
    """
    low, high = float(volume.min()), float(volume.max())
    slope = float(f"{(high - low) / (int(INT16.max) - int(INT16.min)):.9g}") if high > low else 1.0
    # rounded as written (DS holds 16 characters), so the pixels are encoded with what readers see
    return slope, float(f"{low - int(INT16.min) * slope:.9g}")


def write_derived_series(source: DicomSource, volume: np.ndarray, folder: Path) -> list[Path]:
    """Write `volume` (X, Y, Z) as one derived instance per source slice into `folder`.

    Each instance is its source instance's header (pixel data gone, private tags dropped) with
    new SOP Instance UIDs, one new SeriesInstanceUID, ImageType DERIVED\\SECONDARY, a reference
    to its source instance, and int16 pixels with one RescaleSlope/RescaleIntercept for the series.
    """
    slope, intercept = rescale_for(volume)
    series_uid, now = generate_uid(), datetime.now()
    written = []
    for k, (i, _) in enumerate(source.slices):
        src = source.datasets[i]
        ds = _copy(src)
        ds.remove_private_tags()
        for keyword in DROPPED_KEYWORDS:
            if keyword in ds:
                delattr(ds, keyword)
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = _series_number(source, "healthy")
        ds.SeriesDescription = "adiff healthy counterfactual"
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
        image_type = list(src.get("ImageType") or [])
        ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
        ds.DerivationDescription = "healthy counterfactual: DDIM encode, classifier-guided decode (adiff)"
        reference = Dataset()
        reference.ReferencedSOPClassUID = src.SOPClassUID
        reference.ReferencedSOPInstanceUID = src.SOPInstanceUID
        ds.SourceImageSequence = [reference]
        _fill_type2(ds)
        _laterality(ds, src)
        # in float64: float32 would round some values to the wrong side of a half step
        exact = (volume[:, :, k].T.astype(np.float64) - intercept) / slope
        stored = np.clip(np.rint(exact), INT16.min, INT16.max)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.Rows, ds.Columns = stored.shape
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.9g}", f"{intercept:.9g}"
        ds.PixelData = np.ascontiguousarray(stored.astype("<i2")).tobytes()
        ds["PixelData"].VR = "OW"  # 16-bit words (the source's element may be OB, or compressed)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = src.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"IM{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
