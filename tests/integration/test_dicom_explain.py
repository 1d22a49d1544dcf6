"""`adiff explain` on DICOM: overlays a viewer puts on the source series, and no patient identifier in MLflow;
inputs unlike the training data refused before anything is written."""

from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from cli_support import one_line_error, runner
from dicom_series import FRAME_OF_REFERENCE_UID, IDENTIFIERS, STUDY_UID, _write_series, dciodvfy, needs_dciodvfy
from mlflow.tracking import MlflowClient

from anomaly_diffusion.cli import app
from anomaly_diffusion.data.dicom import read_dicom_series

NAME_PARTS = ("Doe", "Jane", "Welby", "Marcus")


def _floats(values: object) -> list[float]:
    return [float(v) for v in values]  # type: ignore[attr-defined]


def _store_text(db: Path) -> str:
    """Every value of every table of the SQLite MLflow store, as text."""
    with sqlite3.connect(db) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        cells = [
            value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            for table in tables
            for row in connection.execute(f'SELECT * FROM "{table}"')
            for value in row
        ]
    return "\n".join(cells)


def _artifact_bytes(root: Path) -> dict[str, bytes]:
    """Every artifact file's content (gzip files decompressed), by name."""
    files = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            files[path.name] = gzip.decompress(data) if path.name.endswith(".gz") else data
    return files


def test_explain_a_dicom_series_writes_overlays_on_it_and_no_identifier_reaches_mlflow(
    tmp_path: Path, tracking_uri: str, bundle: Path
) -> None:
    rng = np.random.default_rng(3)
    stored = np.zeros((24, 20, 8), np.int16)
    stored[3:21, 3:17, 1:7] = rng.integers(500, 900, (18, 14, 6))
    folder = tmp_path / "Doe_Jane_PID-778899"  # a PACS export named after the patient
    _write_series(folder, stored)
    out = tmp_path / "explain"
    args = ["explain", str(folder), "--checkpoint", str(bundle), "--out", str(out), "--tracking-uri", tracking_uri]

    result = runner.invoke(app, args)

    assert result.exit_code == 0, result.output
    (map_path,) = out.glob("*_anomaly_map.nii.gz")
    stem = map_path.name.removesuffix("_anomaly_map.nii.gz")
    assert stem.startswith("series-")  # the folder's name would have carried the patient's name into MLflow
    summary = json.loads((out / f"{stem}_explain.json").read_text())
    assert {"anomaly_map_dicom", "anomaly_seg_dicom", "healthy_dicom"} <= set(summary["outputs"])
    anomaly = np.asarray(nib.load(map_path).dataobj)
    healthy = np.asarray(nib.load(out / f"{stem}_healthy.nii.gz").dataobj)
    threshold = summary["metrics"]["anomaly_threshold"]
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in folder.iterdir())}
    reference = read_dicom_series(folder)
    uids = [str(ds.SOPInstanceUID) for ds in reference.source.datasets]
    slice_of = {uids[i]: k for k, (i, _) in enumerate(reference.source.slices)}

    # the anomaly map (Parametric Map) and its threshold (Segmentation): one frame per source slice,
    # each with that slice's geometry, values equal to the NIfTI map's
    pm = pydicom.dcmread(out / f"{stem}_anomaly_map.dcm")
    seg = pydicom.dcmread(out / f"{stem}_anomaly_seg.dcm")
    for ds, expected in ((pm, anomaly), (seg, anomaly > threshold)):
        assert ds.FrameOfReferenceUID == FRAME_OF_REFERENCE_UID and ds.StudyInstanceUID == STUDY_UID
        assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources.values()}
        assert ds.SOPInstanceUID not in sources and ds.PatientID == IDENTIFIERS["PatientID"]
        shared = ds.SharedFunctionalGroupsSequence[0]
        covered = set()
        for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
            uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            source = sources[uid]
            assert _floats(frame.PlanePositionSequence[0].ImagePositionPatient) == _floats(source.ImagePositionPatient)
            iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
            assert _floats(iop) == _floats(source.ImageOrientationPatient)
            assert _floats(shared.PixelMeasuresSequence[0].PixelSpacing) == _floats(source.PixelSpacing)
            values = ds.pixel_array[f]
            if ds is pm:
                mapping = shared.RealWorldValueMappingSequence[0]
                values = values * float(mapping.RealWorldValueSlope) + float(mapping.RealWorldValueIntercept)
            np.testing.assert_array_equal(values, expected[:, :, slice_of[uid]].T)
            covered.add(slice_of[uid])
        assert covered == set(range(stored.shape[2]))
    assert pm.SeriesInstanceUID != seg.SeriesInstanceUID

    # the counterfactual: a derived MR series, one instance per source slice, on the input's grid
    derived = out / f"{stem}_healthy_dcm"
    instances = [pydicom.dcmread(p) for p in derived.iterdir()]
    assert len(instances) == stored.shape[2]
    for ds in instances:
        source = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            assert _floats(ds[keyword].value) == _floats(source[keyword].value)
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID and ds.StudyInstanceUID == STUDY_UID
        assert ds.SOPInstanceUID not in sources and ds.SeriesInstanceUID != source.SeriesInstanceUID
    again = read_dicom_series(derived)
    np.testing.assert_allclose(again.affine, reference.affine, atol=1e-9)
    step = float(instances[0].RescaleSlope)  # the encoding's precision: half a step, plus float32 rounding
    np.testing.assert_allclose(again.data, healthy, rtol=0, atol=step / 2 + 2e-7 * np.abs(healthy).max())

    # nothing identifying in MLflow: params, tags, run names, metrics (the whole store) or any artifact
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="tags.`adiff.kind` = 'explain'"
    )
    store = _store_text(Path(tracking_uri.removeprefix("sqlite:///"))).lower()
    artifacts = _artifact_bytes(Path(run.info.artifact_uri.removeprefix("file://")))
    assert {f"{stem}_anomaly_map.nii.gz", f"{stem}_explain.json", "README.md"} <= set(artifacts)
    assert not any(name.endswith(".dcm") or name.startswith("IM") for name in artifacts)  # DICOM stays out
    for value in [*IDENTIFIERS.values(), "1970-01-01"]:
        assert value.lower() not in store, value
        for name, data in artifacts.items():
            assert value.lower().encode() not in data.lower(), (value, name)
    for part in NAME_PARTS:
        assert part.lower() not in store, part
        for name, data in artifacts.items():
            if name.endswith((".json", ".md", ".txt")):
                assert part.lower().encode() not in data.lower(), (part, name)
    for value in IDENTIFIERS.values():
        assert value not in result.output


def test_a_colour_png_for_a_model_of_volumes_is_refused_before_any_run_or_output(
    tmp_path: Path, tracking_uri: str, bundle: Path
) -> None:
    from skimage import io as skio

    montage = np.random.default_rng(0).integers(0, 255, (40, 60, 3)).astype(np.uint8)
    skio.imsave(tmp_path / "montage.png", montage, check_contrast=False)
    out = tmp_path / "explain"
    args = ["explain", str(tmp_path / "montage.png"), "--checkpoint", str(bundle), "--out", str(out)]

    line = one_line_error(runner.invoke(app, [*args, "--tracking-uri", tracking_uri]))

    assert "montage.png: a 2D colour image (60x40), but the model was trained on 3D volumes" in line
    assert not out.exists()
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.data.tags["adiff.kind"] for r in runs] == ["train"]


def _on_nifti_grid(volume: object, affine: np.ndarray) -> np.ndarray:
    """A highdicom Volume's voxels resampled by index onto a NIfTI grid (X, Y, Z): each of its voxel centres
    maps to a NIfTI voxel centre, or the test fails (same grid, any axis order or direction). A SEG's volume
    has a fourth axis, its segments: the only one is taken."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    array = volume.array  # type: ignore[attr-defined]
    array = array[..., 0] if array.ndim == 4 else array
    index = np.indices(array.shape).reshape(3, -1)
    world = lps_to_ras @ volume.affine @ np.vstack([index, np.ones(index.shape[1])])  # type: ignore[attr-defined]
    ijk = (np.linalg.inv(affine) @ world)[:3]
    assert np.abs(ijk - np.rint(ijk)).max() < 1e-4
    ijk = np.rint(ijk).astype(int)
    out = np.full(tuple(ijk.max(axis=1) + 1), np.nan)
    out[tuple(ijk)] = array.reshape(-1)
    return out


@needs_dciodvfy
def test_every_dicom_output_of_an_explain_passes_dciodvfy_and_reads_back_as_the_nifti_maps(
    tmp_path: Path, tracking_uri: str, bundle: Path
) -> None:
    import highdicom as hd

    rng = np.random.default_rng(3)
    stored = np.zeros((24, 20, 8), np.int16)
    stored[3:21, 3:17, 1:7] = rng.integers(500, 900, (18, 14, 6))
    folder = tmp_path / "series"
    _write_series(folder, stored)
    for path in folder.iterdir():  # the source itself is conformant: a new error is the writer's
        assert dciodvfy(path)[0] == [], path.name
    out = tmp_path / "explain"
    args = ["explain", str(folder), "--checkpoint", str(bundle), "--out", str(out), "--tracking-uri", tracking_uri]

    result = runner.invoke(app, args)

    assert result.exit_code == 0, result.output
    (map_path,) = out.glob("*_anomaly_map.nii.gz")
    stem = map_path.name.removesuffix("_anomaly_map.nii.gz")
    pm_path, seg_path, derived = (
        out / f"{stem}_{name}" for name in ("anomaly_map.dcm", "anomaly_seg.dcm", "healthy_dcm")
    )
    instances = sorted(derived.iterdir())
    assert len(instances) == stored.shape[2]
    for path in (pm_path, seg_path, *instances):
        errors, _ = dciodvfy(path)
        assert errors == [], (path.name, errors)

    # highdicom reads every object back; each equals its NIfTI output to the stored precision
    nifti = nib.load(map_path)
    anomaly = np.asarray(nifti.dataobj)
    healthy = np.asarray(nib.load(out / f"{stem}_healthy.nii.gz").dataobj)
    threshold = json.loads((out / f"{stem}_explain.json").read_text())["metrics"]["anomaly_threshold"]
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(pm_path))
    np.testing.assert_array_equal(_on_nifti_grid(pm.get_volume(), nifti.affine), anomaly)  # float32: exact
    seg = hd.seg.segread(seg_path)
    np.testing.assert_array_equal(_on_nifti_grid(seg.get_volume(), nifti.affine), anomaly > threshold)
    series = [hd.imread(path) for path in instances]
    volume = hd.get_volume_from_series(series)
    step = float(pydicom.dcmread(instances[0]).RescaleSlope)
    precision = step / 2 + 2e-7 * np.abs(healthy).max()  # half an int16 step, plus float32 rounding
    np.testing.assert_allclose(_on_nifti_grid(volume, nifti.affine), healthy, rtol=0, atol=precision)
