"""DICOM outputs on the source's geometry: Parametric Map, Segmentation, derived series, read back with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_series import (
    FRAME_OF_REFERENCE_UID,
    IDENTIFIERS,
    PATIENT_NAME,
    STUDY_UID,
    _stored_volume,
    _write_enhanced,
    _write_series,
    dciodvfy,
    needs_dciodvfy,
)
from pydicom.dataset import Dataset

from anomaly_diffusion.data.dicom import REDACTED, read_dicom_series, redact
from anomaly_diffusion.data.dicom_out import plan_dicom_outputs, rescale_for, write_dicom_outputs
from anomaly_diffusion.data.io import Scan, load_scan
from anomaly_diffusion.files import atomic_write_folder

THRESHOLD = 0.6
SHAPE = (12, 10, 6)  # (X, Y, Z) all different, so a transpose shows; large enough for load_scan


def _floats(values: object) -> list[float]:
    return [float(v) for v in values]  # type: ignore[attr-defined]


def _source_slices(folder: Path) -> dict[str, Dataset]:
    """Source instances by SOPInstanceUID."""
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in folder.iterdir())}


def _maps(scan: Scan) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    anomaly = rng.random(scan.data.shape[1:]).astype(np.float32)
    healthy = (scan.data + rng.normal(0, 40, scan.data.shape)).astype(np.float32)
    return anomaly, healthy


def _slice_of(scan: Scan, sop_uid: str) -> int:
    """The volume's slice index k of a source instance."""
    source = scan.dicom[0]
    assert source is not None
    uids = [str(ds.SOPInstanceUID) for ds in source.datasets]
    return next(k for k, (i, _) in enumerate(source.slices) if uids[i] == sop_uid)


def _check_frame_geometry(frame: Dataset, shared: Dataset, source: Dataset) -> None:
    ipp = frame.PlanePositionSequence[0].ImagePositionPatient
    assert _floats(ipp) == _floats(source.ImagePositionPatient)
    assert _floats(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == _floats(
        source.ImageOrientationPatient
    )
    assert _floats(shared.PixelMeasuresSequence[0].PixelSpacing) == _floats(source.PixelSpacing)


def _check_new_series_same_study(ds: Dataset, source: Dataset) -> None:
    assert ds.FrameOfReferenceUID == FRAME_OF_REFERENCE_UID == source.FrameOfReferenceUID
    assert ds.StudyInstanceUID == STUDY_UID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID != source.SOPInstanceUID
    assert str(ds.PatientName) == PATIENT_NAME and ds.PatientID == IDENTIFIERS["PatientID"]  # DICOM outputs only
    assert ds.AccessionNumber == IDENTIFIERS["AccessionNumber"]


def test_series_outputs_keep_the_source_geometry_and_values(tmp_path: Path) -> None:
    series = tmp_path / "series"
    _write_series(series, _stored_volume(SHAPE))
    scan = load_scan([series])
    anomaly, healthy = _maps(scan)
    plan = plan_dicom_outputs(scan, tmp_path / "out", ["series"])
    assert sorted(plan.paths) == ["anomaly_map_dicom", "anomaly_seg_dicom", "healthy_dicom"] and plan.note is None

    write_dicom_outputs(scan, anomaly, healthy, THRESHOLD, plan)

    sources = _source_slices(series)
    any_source = next(iter(sources.values()))
    pm = pydicom.dcmread(plan.paths["anomaly_map_dicom"])
    assert pm.SOPClassUID.name == "Parametric Map Storage" and int(pm.NumberOfFrames) == SHAPE[2]
    _check_new_series_same_study(pm, any_source)
    shared = pm.SharedFunctionalGroupsSequence[0]
    mapping = shared.RealWorldValueMappingSequence[0]
    slope, intercept = float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)
    seen = set()
    for f, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        _check_frame_geometry(frame, shared, sources[uid])
        k = _slice_of(scan, uid)
        np.testing.assert_array_equal(pm.pixel_array[f] * slope + intercept, anomaly[:, :, k].T)  # float32: exact
        seen.add(k)
    assert seen == set(range(SHAPE[2]))  # one frame per source slice

    seg_path = plan.paths["anomaly_seg_dicom"]
    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID.name == "Segmentation Storage" and int(seg.NumberOfFrames) == SHAPE[2]
    _check_new_series_same_study(seg, any_source)
    assert seg.SeriesInstanceUID != pm.SeriesInstanceUID
    for f, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        _check_frame_geometry(frame, seg.SharedFunctionalGroupsSequence[0], sources[uid])
        np.testing.assert_array_equal(seg.pixel_array[f] > 0, anomaly[:, :, _slice_of(scan, uid)].T > THRESHOLD)

    # highdicom itself sees each as one regular volume on the scan's grid (what a viewer builds to overlay)
    import highdicom as hd

    for volume in (
        hd.pm.ParametricMap.from_dataset(pydicom.dcmread(plan.paths["anomaly_map_dicom"])).get_volume(),
        hd.seg.segread(seg_path).get_volume(),
    ):
        assert volume.spatial_shape == (SHAPE[2], SHAPE[1], SHAPE[0])
        lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
        spacing = np.linalg.svd(scan.affine[:3, :3], compute_uv=False)  # voxel sizes, whatever the axis order
        np.testing.assert_allclose(np.linalg.svd(volume.affine[:3, :3], compute_uv=False), spacing)
        ends = [(0, n - 1) for n in SHAPE]
        corners = np.array([(scan.affine @ [i, j, k, 1])[:3] for i in ends[0] for j in ends[1] for k in ends[2]])
        theirs = np.array(
            [(lps_to_ras @ volume.affine @ [s, r, c, 1])[:3] for s in ends[2] for r in ends[1] for c in ends[0]]
        )
        distances = np.linalg.norm(corners[:, None] - theirs[None], axis=-1)
        assert (distances.min(axis=1) < 1e-4).all() and (distances.min(axis=0) < 1e-4).all()  # same 8 corners

    folder = plan.paths["healthy_dicom"]
    instances = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    assert len(instances) == SHAPE[2] and len({ds.SeriesInstanceUID for ds in instances}) == 1
    slope, _ = rescale_for(healthy[0])
    precision = slope / 2 + 2e-7 * np.abs(healthy).max()  # half an int16 step, plus float32 rounding
    for ds in instances:
        src = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        _check_new_series_same_study(ds, src)
        assert ds.SOPClassUID == src.SOPClassUID and list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            assert _floats(ds[keyword].value) == _floats(src[keyword].value)
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        k = _slice_of(scan, str(src.SOPInstanceUID))
        np.testing.assert_allclose(values, healthy[0][:, :, k].T, rtol=0, atol=precision)
    # our own reader sees the counterfactual on exactly the input's grid
    again = read_dicom_series(folder)
    np.testing.assert_allclose(again.affine, scan.affine, atol=1e-9)
    np.testing.assert_allclose(again.data, healthy[0], rtol=0, atol=precision)


def test_an_enhanced_multiframe_source_gets_maps_in_its_frame_order(tmp_path: Path) -> None:
    stored = _stored_volume(SHAPE)
    file_order = np.random.default_rng(2).permutation(SHAPE[2])
    (tmp_path / "in").mkdir()
    _write_enhanced(tmp_path / "in" / "enhanced.dcm", stored, file_order)
    scan = load_scan([tmp_path / "in"])
    anomaly, healthy = _maps(scan)
    plan = plan_dicom_outputs(scan, tmp_path / "out", ["in"])
    assert plan.paths["healthy_dicom"].name == "in_healthy.dcm"  # a second Parametric Map, not a folder

    write_dicom_outputs(scan, anomaly, healthy, THRESHOLD, plan)

    source = pydicom.dcmread(tmp_path / "in" / "enhanced.dcm")
    for key, expected in (("anomaly_map_dicom", anomaly), ("healthy_dicom", healthy[0])):
        pm = pydicom.dcmread(plan.paths[key])
        _check_new_series_same_study(pm, source)
        for f, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
            ipp = _floats(frame.PlanePositionSequence[0].ImagePositionPatient)
            # the slice k whose source frame has this position: frame order is highdicom's to choose
            source_frame = next(
                g
                for g, item in enumerate(source.PerFrameFunctionalGroupsSequence)
                if _floats(item.PlanePositionSequence[0].ImagePositionPatient) == ipp
            )
            np.testing.assert_array_equal(pm.pixel_array[f], expected[:, :, file_order[source_frame]].T)


def test_no_dicom_outputs_without_a_frame_of_reference(tmp_path: Path) -> None:
    series = tmp_path / "series"
    _write_series(series, _stored_volume(SHAPE))
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    plan = plan_dicom_outputs(load_scan([series]), tmp_path, ["series"])
    assert plan.paths == {} and plan.note == "no DICOM outputs: the series has no FrameOfReferenceUID"


def test_identifiers_cover_names_ids_dates_and_redact_ignores_case(tmp_path: Path) -> None:
    series = tmp_path / "series"
    _write_series(series, _stored_volume(SHAPE))
    found = load_scan([series]).identifiers()
    for value in IDENTIFIERS.values():
        assert value in found
    assert {"Doe", "Jane", "1970-01-01", "Welby"} <= set(found)
    assert list(found) == sorted(found, key=lambda t: (-len(t), t))  # longest first
    text = "/data/DOE_JANE_pid-778899/born 1970-01-01, Doe^Jane"
    assert redact(text, found) == f"/data/{REDACTED}_{REDACTED}_{REDACTED}/born {REDACTED}, {REDACTED}"
    assert redact("brain t1", found) == "brain t1"


def test_atomic_folder_replaces_whole_or_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "series_dcm"

    def write(names: list[str]) -> object:
        return lambda folder: [(folder / n).write_text(n) for n in names]

    atomic_write_folder(target, write(["a", "b"]))
    atomic_write_folder(target, write(["c"]))
    assert sorted(p.name for p in target.iterdir()) == ["c"]

    def fail(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_folder(target, fail)
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series_dcm"]  # no temporary folder left


SPARSE_SOURCE = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "StudyID",
    "Manufacturer",
    "PositionReferenceIndicator",
    "BodyPartExamined",
    "PatientPosition",
    "ScanOptions",
    "MRAcquisitionType",
    "RepetitionTime",
    "EchoTime",
    "EchoTrainLength",
)
"""Type 2 (and 2C) attributes a real export may lack: the outputs must have them all the same."""


@needs_dciodvfy
def test_the_synthetic_source_series_passes_dciodvfy(tmp_path: Path) -> None:
    _write_series(tmp_path, _stored_volume(SHAPE))
    for path in tmp_path.iterdir():
        errors, _ = dciodvfy(path)
        assert errors == [], (path.name, errors)


@needs_dciodvfy
@pytest.mark.parametrize("sparse", [False, True], ids=["conformant-source", "source-lacking-type-2"])
def test_every_output_object_passes_dciodvfy_with_zero_errors(tmp_path: Path, sparse: bool) -> None:
    series = tmp_path / "series"
    _write_series(series, _stored_volume(SHAPE))
    if sparse:
        for path in series.iterdir():
            ds = pydicom.dcmread(path)
            for keyword in SPARSE_SOURCE:
                delattr(ds, keyword)
            ds.save_as(path)
    scan = load_scan([series])
    anomaly, healthy = _maps(scan)
    anomaly *= 0.3  # scores well below 1, as a trained model's are: the window is narrower than 1
    plan = plan_dicom_outputs(scan, tmp_path / "out", ["series"])

    write_dicom_outputs(scan, anomaly, healthy, THRESHOLD * 0.3, plan)

    objects = [plan.paths["anomaly_map_dicom"], plan.paths["anomaly_seg_dicom"]]
    objects += sorted(plan.paths["healthy_dicom"].iterdir())
    assert len(objects) == 2 + SHAPE[2]
    for path in objects:
        errors, _ = dciodvfy(path)
        assert errors == [], (path.name, errors)
    pm = pydicom.dcmread(plan.paths["anomaly_map_dicom"])
    voi = pm.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    assert voi.VOILUTFunction == "LINEAR_EXACT"
    low, high = float(anomaly.min()), float(anomaly.max())
    assert float(voi.WindowWidth) == pytest.approx(high - low) and float(voi.WindowCenter) == pytest.approx(
        (low + high) / 2
    )
    assert float(voi.WindowWidth) < 1
    derived = pydicom.dcmread(objects[2])
    if sparse:  # present and empty (unknown), never invented
        for keyword in SPARSE_SOURCE:
            if keyword != "BodyPartExamined":
                assert keyword in derived and derived[keyword].value in (None, ""), keyword
        assert pm.Laterality == "" and derived.Laterality == ""  # 2C: the body part is unknown, so it may be paired
    else:  # the source's values, and no Laterality for an unpaired body part
        assert derived.EchoTime == 15 and derived.Manufacturer == "ACME" and derived.PatientPosition == "HFS"
        assert pm.BodyPartExamined == "BRAIN" and "Laterality" not in pm and "Laterality" not in derived


@needs_dciodvfy
@pytest.mark.parametrize(
    ("body_part", "laterality", "expected"),
    [("BREAST", "L", "L"), (None, "R", "R"), ("KNEE", None, ""), ("BRAIN", None, None)],
)
def test_laterality_follows_the_body_part_and_no_object_errs(
    tmp_path: Path, body_part: str | None, laterality: str | None, expected: str | None
) -> None:
    """Laterality (Type 2C) is the source's, empty (unknown) for a paired part without one, absent for an
    unpaired part; never in the SEG (dciodvfy forbids it there)."""
    series = tmp_path / "series"
    _write_series(series, _stored_volume(SHAPE))
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        del ds.BodyPartExamined
        if body_part:
            ds.BodyPartExamined = body_part
        if laterality:
            ds.Laterality = laterality
        ds.save_as(path)
    scan = load_scan([series])
    anomaly, healthy = _maps(scan)
    plan = plan_dicom_outputs(scan, tmp_path / "out", ["series"])

    write_dicom_outputs(scan, anomaly, healthy, THRESHOLD, plan)

    pm, seg = (plan.paths[key] for key in ("anomaly_map_dicom", "anomaly_seg_dicom"))
    derived = sorted(plan.paths["healthy_dicom"].iterdir())[0]
    for path in (pm, seg, derived):
        errors, _ = dciodvfy(path)
        assert errors == [], (path.name, errors)
    for path in (pm, derived):
        assert pydicom.dcmread(path).get("Laterality") == expected
    assert "Laterality" not in pydicom.dcmread(seg)
