"""Every bad input of issue 6, through the real CLI: exit code 1, one line naming the problem,
and an output that existed before is byte-identical afterwards."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_support import one_line_error, runner
from dicom_series import _stored_volume, _write_series
from mlflow.tracking import MlflowClient

from anomaly_diffusion.cli import app
from anomaly_diffusion.tracking import free_port

EARLIER = b"an earlier result, must survive"


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    return path


def _scan(rng: np.random.Generator, shape: tuple[int, ...] = (24, 20, 10)) -> np.ndarray:
    array = np.zeros(shape, np.float32)
    array[3:-3, 3:-3] = 100 + 10 * rng.random((shape[0] - 6, shape[1] - 6, *shape[2:]))
    return array


def _case_missing(d: Path) -> list[str]:
    return [str(d / "nope.nii.gz")]


def _case_not_an_image(d: Path) -> list[str]:
    (d / "notes.nii.gz").write_bytes(gzip.compress(b"these are notes, not a scan"))
    return [str(d / "notes.nii.gz")]


def _case_truncated(d: Path) -> list[str]:
    good = _nifti(d / "good.nii.gz", _scan(np.random.default_rng(0)))
    (d / "cut.nii.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return [str(d / "cut.nii.gz")]


def _case_4d(d: Path) -> list[str]:
    return [str(_nifti(d / "fmri.nii.gz", np.stack([_scan(np.random.default_rng(i)) for i in range(3)], -1)))]


def _case_nan(d: Path) -> list[str]:
    array = _scan(np.random.default_rng(0))
    array[5, 5, 5] = np.nan
    return [str(_nifti(d / "nan.nii.gz", array))]


def _case_zero(d: Path) -> list[str]:
    return [str(_nifti(d / "zero.nii.gz", np.zeros((24, 20, 10), np.float32)))]


def _case_channels(d: Path) -> list[str]:
    path = _nifti(d / "a.nii.gz", _scan(np.random.default_rng(0)))
    return [str(path), str(path)]


def _case_too_small(d: Path) -> list[str]:
    return [str(_nifti(d / "tiny.nii.gz", np.random.default_rng(0).random((4, 4, 3)).astype(np.float32) + 1))]


def _case_dicom_without_pixels(d: Path) -> list[str]:
    from dicom_series import _positions, _write_slice

    folder = d / "nopix"
    folder.mkdir()
    for k, position in enumerate(_positions(3, 2.5)):
        _write_slice(folder / f"IM{k}", _stored_volume()[:, :, k], position, "1.2.3.4", k + 1, pixels=False)
    return [str(folder)]


def _case_mixed_series(d: Path) -> list[str]:
    folder = d / "mixed"
    _write_series(folder, _stored_volume(), series_uid="1.2.3.4.1")
    _write_series(d / "other", _stored_volume(), series_uid="1.2.3.4.2")
    for file in (d / "other").iterdir():
        file.rename(folder / f"B{file.name}")  # same names in both series: keep both
    return [str(folder)]


def _case_uneven_spacing(d: Path) -> list[str]:
    folder = d / "gap"
    _write_series(folder, _stored_volume(), skip=[2])
    return [str(folder)]


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "missing path": (_case_missing, "file not found"),
    "not a NIfTI": (_case_not_an_image, "NIfTI"),
    "truncated .nii.gz": (_case_truncated, "truncated or corrupt"),
    "4D image": (_case_4d, "4D image with 3 volumes"),
    "NaN voxels": (_case_nan, "NaN or Inf"),
    "all-zero scan": (_case_zero, "constant"),
    "wrong channel count": (_case_channels, "expects 1 channel"),
    "image too small": (_case_too_small, "too small"),
    "DICOM without pixel data": (_case_dicom_without_pixels, "pixel data"),
    "mixed DICOM series": (_case_mixed_series, "2 DICOM series"),
    "uneven slice spacing": (_case_uneven_spacing, "spacing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_scan(case: str, tmp_path: Path, bundle: Path, tracking_uri: str) -> None:
    make, message = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args = make(inputs)
    out = tmp_path / "out"
    out.mkdir()
    stem = Path(args[0]).name.split(".")[0]
    earlier = out / f"{stem}_anomaly_map.nii.gz"
    earlier.write_bytes(EARLIER)
    result = runner.invoke(
        app,
        [
            "explain",
            *args,
            "--checkpoint",
            str(bundle),
            "--out",
            str(out),
            "--overwrite",
            "--tracking-uri",
            tracking_uri,
        ],
    )
    line = one_line_error(result)
    assert message in line, line
    assert Path(args[0]).name in line
    assert earlier.read_bytes() == EARLIER
    assert sorted(p.name for p in out.iterdir()) == [earlier.name]  # nothing half-written beside it
    client = MlflowClient(tracking_uri)
    names = [
        r.info.run_name for r in client.search_runs([client.get_experiment_by_name("anomaly_diffusion").experiment_id])
    ]
    assert names == ["tiny-train"]  # no explain run for a refused input


def _explain(tmp_path: Path, tiny_dataset: Path, bundle: Path, uri: str, *extra: str) -> tuple[str, Path]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    earlier = out / "s5_t1_anomaly_map.nii.gz"
    earlier.write_bytes(EARLIER)
    scan = str(tiny_dataset.parent / "s5_t1.nii.gz")
    result = runner.invoke(
        app, ["explain", scan, "--checkpoint", str(bundle), "--out", str(out), "--tracking-uri", uri, *extra]
    )
    line = one_line_error(result)
    assert earlier.read_bytes() == EARLIER
    return line, out


def test_mask_on_another_grid(tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str) -> None:
    mask = _nifti(tmp_path / "mask.nii.gz", np.zeros((24, 20, 9), np.uint8))
    line, _ = _explain(tmp_path, tiny_dataset, bundle, tracking_uri, "--mask", str(mask), "--overwrite")
    assert "mask shape (24, 20, 9) differs from image shape (24, 20, 10)" in line


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--noise-level", "100"], "noise level must be in 1..99"),
        (["--noise-level", "0"], "noise level must be in 1..99"),
        (["--scale", "-3"], "scale must be in"),
        (["--scale", "1e9"], "scale must be in"),
        (["--steps", "500"], "steps must be in"),
    ],
)
def test_options_out_of_range(
    option: list[str], message: str, tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str
) -> None:
    line, _ = _explain(tmp_path, tiny_dataset, bundle, tracking_uri, *option, "--overwrite")
    assert message in line


def test_checkpoint_from_another_config_or_not_a_bundle(
    tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str
) -> None:
    data = torch.load(bundle, weights_only=True)
    data["config"]["unet"]["channels"] = [16, 16]
    torch.save(data, tmp_path / "other.pt")
    line, _ = _explain(tmp_path, tiny_dataset, tmp_path / "other.pt", tracking_uri, "--overwrite")
    assert "unet weights do not match the bundle's config" in line
    torch.save({"state_dict": torch.zeros(3)}, tmp_path / "plain.pt")
    line, _ = _explain(tmp_path, tiny_dataset, tmp_path / "plain.pt", tracking_uri, "--overwrite")
    assert "not an adiff model bundle" in line
    shutil.copy(tiny_dataset, tmp_path / "text.pt")
    line, _ = _explain(tmp_path, tiny_dataset, tmp_path / "text.pt", tracking_uri, "--overwrite")
    assert "not a readable checkpoint" in line


def test_output_exists_without_overwrite(tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str) -> None:
    line, _ = _explain(tmp_path, tiny_dataset, bundle, tracking_uri)
    assert "already exists; pass --overwrite" in line


def test_output_folder_not_writable(tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str) -> None:
    (tmp_path / "a_file").write_text("a file, not a folder")
    scan = str(tiny_dataset.parent / "s5_t1.nii.gz")
    result = runner.invoke(
        app,
        [
            "explain",
            scan,
            "--checkpoint",
            str(bundle),
            "--out",
            str(tmp_path / "a_file" / "out"),
            "--tracking-uri",
            tracking_uri,
        ],
    )
    assert "cannot create output folder" in one_line_error(result)


def test_unreachable_tracking_server(tmp_path: Path, tiny_dataset: Path) -> None:
    uri = f"http://127.0.0.1:{free_port(6100)}"
    args = ["train", "--config", "tiny", "--set", f"data.manifest={tiny_dataset}", "--tracking-uri", uri]
    line = one_line_error(runner.invoke(app, args))
    assert "is not reachable" in line and "--local-tracking" in line
    result = runner.invoke(app, [*args, "--local-tracking", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "logging to sqlite:///mlruns.db instead" in result.output
    assert (tmp_path / "r" / "bundle.pt").is_file() and (tmp_path / "mlruns.db").is_file()
