"""A full disk on every surface that writes: one `error:` line naming the folder, exit status 1, no partial
output, nothing lost (an earlier checkpoint, the cohort's finished studies), and a rerun once space is freed
finishes the job. The disk is filled by making the atomic writer's file system calls fail with ENOSPC."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cli_support import runner, tiny_train_args
from click.testing import Result
from dicom_series import _write_series

from anomaly_diffusion import files
from anomaly_diffusion.cli import app
from anomaly_diffusion.models.bundle import read_bundle_file

SIZE = r"[0-9.]+ (GB|MB|bytes)"
FULL = rf"no space left on device, {SIZE} free(; the step needed {SIZE})?; free space there and rerun"


def fill_disk(monkeypatch: pytest.MonkeyPatch, when: Callable[[Path], bool]) -> list[Path]:
    """Make every atomic write whose temporary path `when` picks write part of its output, then fail with
    ENOSPC, as a full file system does; returns the temporary paths that failed."""
    failed: list[Path] = []
    real = files._fill

    def fill(write: Callable[[Path], object], tmp: Path) -> None:
        if not when(tmp):
            real(write, tmp)
            return
        failed.append(tmp)
        (tmp / "part" if tmp.is_dir() else tmp).write_bytes(b"the first blocks")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    monkeypatch.setattr(files, "_fill", fill)
    return failed


def the_error(result: Result) -> str:
    """Exit status 1, exactly one `error:` line, the last (after what the command announced), no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.output
    assert "Traceback" not in result.output and lines[-1].startswith("error:")
    return lines[-1]


def under(folder: Path) -> Callable[[Path], bool]:
    return lambda tmp: folder in tmp.parents


def no_temporaries(folder: Path) -> None:
    """No half-written file or folder (the atomic writers' temporaries start with a dot)."""
    assert not [p for p in folder.rglob(".*")], list(folder.rglob(".*"))


def _scan(path: Path) -> Path:
    import nibabel as nib

    rng = np.random.default_rng(0)
    image = np.zeros((24, 20, 10), np.float32)
    image[3:21, 3:17, 2:8] = 100 + 10 * rng.random((18, 14, 6))
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    return path


def test_explain_on_a_full_disk(
    tmp_path: Path, bundle: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    scan, out = _scan(tmp_path / "t1.nii.gz"), tmp_path / "explain"
    args = ["explain", str(scan), "--checkpoint", str(bundle), "--out", str(out), "--tracking-uri", tracking_uri]
    failed = fill_disk(monkeypatch, under(out))

    line = the_error(runner.invoke(app, args))

    assert re.fullmatch(rf"error: {re.escape(str(out))}: {FULL}", line), line
    assert failed and not [p for p in out.rglob("*") if p.is_file()]  # nothing partial: no output at all
    monkeypatch.undo()  # space freed: the rerun completes
    assert runner.invoke(app, args).exit_code == 0
    assert (out / "t1_anomaly_map.nii.gz").is_file() and (out / "t1_explain.json").is_file()
    no_temporaries(out)


def test_explain_dicom_outputs_on_a_full_disk(
    tmp_path: Path, bundle: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    stored = np.zeros((24, 20, 8), np.int16)
    stored[3:21, 3:17, 1:7] = rng.integers(500, 900, (18, 14, 6))
    _write_series(tmp_path / "series", stored)
    out = tmp_path / "explain"
    args = ["explain", str(tmp_path / "series"), "--checkpoint", str(bundle), "--out", str(out)]
    fill_disk(monkeypatch, lambda tmp: ".dcm" in tmp.name or "_dcm." in tmp.name)  # only the DICOM writers fail

    line = the_error(runner.invoke(app, [*args, "--tracking-uri", tracking_uri]))

    assert re.fullmatch(rf"error: {re.escape(str(out))}: {FULL}", line), line
    assert not list(out.glob("*.dcm")) and not list(out.glob("*_dcm"))
    no_temporaries(out)


def test_mlflow_artifacts_on_a_full_disk(
    tmp_path: Path, bundle: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow copies artifacts with its own writer: its ENOSPC, too, is one line naming the folder."""
    from anomaly_diffusion.tracking import MlflowRunLogger

    store = tmp_path / "mlartifacts" / "1"

    def full(self: object, path: Path, artifact_path: str | None = None) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(store / path.name))

    monkeypatch.setattr(MlflowRunLogger, "log_artifact", full)
    scan, out = _scan(tmp_path / "t1.nii.gz"), tmp_path / "explain"
    args = ["explain", str(scan), "--checkpoint", str(bundle), "--out", str(out), "--tracking-uri", tracking_uri]

    line = the_error(runner.invoke(app, args))

    assert re.fullmatch(rf"error: {re.escape(str(store))}: {FULL}", line), line
    no_temporaries(out)


def test_cohort_on_a_full_disk_records_the_study_stops_and_a_rerun_completes(
    tmp_path: Path, bundle: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from anomaly_diffusion.data.manifest import ManifestRow, write_manifest

    data = tmp_path / "studies"
    data.mkdir()
    rows = [ManifestRow(f"s{i}", "test", (_scan(data / f"s{i}.nii.gz"),)) for i in range(3)]  # type: ignore[arg-type]
    manifest = write_manifest(rows, data / "manifest.csv")
    out = tmp_path / "cohort"
    args = ["explain", str(manifest), "--checkpoint", str(bundle), "--out", str(out), "--tracking-uri", tracking_uri]
    fill_disk(monkeypatch, lambda tmp: tmp.name.startswith(".s1_") and ".nii.gz" in tmp.name)  # s1's maps fail

    line = the_error(runner.invoke(app, args))

    assert re.fullmatch(rf"error: {re.escape(str(out / 's1'))}: {FULL}", line), line
    records = {s: json.loads((out / s / "study.json").read_text()) for s in ("s0", "s1")}
    assert records["s0"]["status"] == "done"  # kept
    assert records["s1"]["status"] == "failed" and "no space left on device" in records["s1"]["error"]
    assert not (out / "s2").exists()  # stopped: s2 would have failed the same way
    no_temporaries(out)
    monkeypatch.undo()

    rerun = runner.invoke(app, args)

    assert rerun.exit_code == 0, rerun.output
    for s in ("s0", "s1", "s2"):
        assert json.loads((out / s / "study.json").read_text())["status"] == "done"


def test_evaluate_on_a_full_disk(
    tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "eval"
    args = ["evaluate", str(tiny_dataset), "--split", "test", "--checkpoint", str(bundle), "--methods", "intensity"]
    args += ["--out", str(out), "--tracking-uri", tracking_uri]
    fill_disk(monkeypatch, under(out))

    line = the_error(runner.invoke(app, args))

    assert re.fullmatch(rf"error: {re.escape(str(out))}: {FULL}", line), line
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_train_on_a_full_disk_keeps_its_last_checkpoint_and_resumes(
    tmp_path: Path, tiny_dataset: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    steps = ["--set", "train.ddpm_steps=30", "--set", "train.classifier_steps=10", "--set", "train.checkpoint_every=10"]
    args = tiny_train_args(tiny_dataset, out, tracking_uri, "full-disk", *steps)
    saved: list[int] = []

    def second_checkpoint(tmp: Path) -> bool:  # the first checkpoint is written, the second finds the disk full
        if tmp.name.startswith(".checkpoint.pt."):
            saved.append(1)
        return len(saved) >= 2 and tmp.name.startswith(".checkpoint.pt.")

    fill_disk(monkeypatch, second_checkpoint)

    line = the_error(runner.invoke(app, args))

    assert re.fullmatch(rf"error: {re.escape(str(out))}: {FULL}", line), line
    assert "the step needed" in line  # a checkpoint's size is known
    kept = read_bundle_file(out / "checkpoint.pt")
    assert kept["extra"]["step"] == 10 and not (out / "bundle.pt").exists()
    no_temporaries(out)
    monkeypatch.undo()

    resumed = runner.invoke(app, ["train", "--resume", str(out), "--tracking-uri", tracking_uri])

    assert resumed.exit_code == 0, resumed.output
    assert read_bundle_file(out / "bundle.pt")["extra"]["complete"] is True


def test_demo_on_a_full_disk(tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "demo"
    fill_disk(monkeypatch, under(work))

    line = the_error(
        runner.invoke(app, ["demo", "--work-dir", str(work), "--subjects", "4", "--tracking-uri", tracking_uri])
    )

    assert re.fullmatch(rf"error: {re.escape(str(work / 'data'))}/?[^:]*: {FULL}", line), line
    assert not [p for p in work.rglob("*") if p.is_file()]


def test_the_mlflow_store_on_a_full_disk(
    tmp_path: Path, bundle: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite says 'database or disk is full' (no errno): one line naming the store's folder."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    def full(*args: object, **kwargs: object) -> None:
        raise MlflowException("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT INTO params ...]")

    monkeypatch.setattr(MlflowClient, "log_batch", full)
    scan, out = _scan(tmp_path / "t1.nii.gz"), tmp_path / "explain"
    args = ["explain", str(scan), "--checkpoint", str(bundle), "--out", str(out), "--tracking-uri", tracking_uri]

    line = the_error(runner.invoke(app, args))

    store = Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent
    assert re.fullmatch(rf"error: {re.escape(str(store))}: {FULL}", line), line
    no_temporaries(out)
