"""One-slice scans (a 48x56x1 NIfTI, a 2D 48x56 NIfTI, a one-instance DICOM series) for a model trained on
volumes: explained as one slice, outputs in the input's own geometry; a picture file stays refused."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from cli_support import one_line_error, runner
from dicom_series import _write_series, dciodvfy, needs_dciodvfy

from anomaly_diffusion.cli import app

AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, 1.5, 0, -20.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])
OUTPUTS = ("anomaly_map", "healthy")


def _slice() -> np.ndarray:
    """A (48, 56) slice like the training volumes' (conftest's `make_volume`): a textured 'brain' ellipse at
    ~100 on a zero background, with a bright lesion."""
    rng = np.random.default_rng(7)
    x, y = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 56), indexing="ij")
    brain = x**2 / 0.8 + y**2 / 0.7 < 1
    image = np.where(brain, 100 + 10 * rng.standard_normal((48, 56)), 0).astype(np.float32)
    image[22:27, 26:31] += 80
    return image


def _explain(inputs: list[Path], bundle: Path, out: Path, tracking_uri: str) -> str:
    args = ["explain", *map(str, inputs), "--checkpoint", str(bundle), "--out", str(out)]
    result = runner.invoke(app, [*args, "--tracking-uri", tracking_uri])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("shape", [(48, 56, 1), (48, 56)], ids=["48x56x1", "48x56"])
def test_a_one_slice_nifti_is_explained_in_its_own_geometry(
    tmp_path: Path, tracking_uri: str, bundle: Path, shape: tuple[int, ...]
) -> None:
    path = tmp_path / "one_slice.nii.gz"
    nib.save(nib.Nifti1Image(_slice().reshape(shape), AFFINE), str(path))
    out = tmp_path / "explain"

    _explain([path], bundle, out, tracking_uri)

    summary = json.loads((out / "one_slice_explain.json").read_text())
    for name in OUTPUTS:
        image = nib.load(out / f"one_slice_{name}.nii.gz")
        assert image.shape == shape, name  # the input's own shape: 2D stays 2D, one slice stays one slice
        np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)
    anomaly = np.asarray(nib.load(out / "one_slice_anomaly_map.nii.gz").dataobj)
    assert np.isfinite(anomaly).all() and anomaly.max() > 0  # explained, not passed through
    assert summary["metrics"]["anomaly_max"] == pytest.approx(float(anomaly.max()))


@needs_dciodvfy
def test_a_one_instance_dicom_series_gets_one_frame_dicom_outputs_that_pass_dciodvfy(
    tmp_path: Path, tracking_uri: str, bundle: Path
) -> None:
    stored = np.rint(_slice() * 4)[:, :, None].astype(np.int16)
    folder = tmp_path / "series"
    positions = _write_series(folder, stored)
    out = tmp_path / "explain"

    _explain([folder], bundle, out, tracking_uri)

    (map_path,) = out.glob("*_anomaly_map.nii.gz")
    stem = map_path.name.removesuffix("_anomaly_map.nii.gz")
    assert nib.load(map_path).shape == (48, 56, 1)
    anomaly = np.asarray(nib.load(map_path).dataobj)
    pm, seg = (pydicom.dcmread(out / f"{stem}_{name}.dcm") for name in ("anomaly_map", "anomaly_seg"))
    (derived,) = (out / f"{stem}_healthy_dcm").iterdir()
    for ds in (pm, seg):
        assert int(ds.NumberOfFrames) == 1
        ipp = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in ipp] == [float(v) for v in positions[0]]
    np.testing.assert_array_equal(pm.pixel_array, anomaly[:, :, 0].T)
    assert [float(v) for v in pydicom.dcmread(derived).ImagePositionPatient] == [float(v) for v in positions[0]]
    for path in (out / f"{stem}_anomaly_map.dcm", out / f"{stem}_anomaly_seg.dcm", derived):
        errors, _ = dciodvfy(path)
        assert errors == [], (path.name, errors)


def test_a_grey_png_for_a_model_of_volumes_stays_refused(tmp_path: Path, tracking_uri: str, bundle: Path) -> None:
    from skimage import io as skio

    image = _slice()
    skio.imsave(tmp_path / "slice.png", (image / image.max() * 255).astype(np.uint8), check_contrast=False)
    out = tmp_path / "explain"
    args = ["explain", str(tmp_path / "slice.png"), "--checkpoint", str(bundle), "--out", str(out)]

    line = one_line_error(runner.invoke(app, [*args, "--tracking-uri", tracking_uri]))

    assert "slice.png: a 2D image (56x48), but the model was trained on 3D volumes" in line
    assert not out.exists()
