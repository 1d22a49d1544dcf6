"""Cohort explain through the real CLI: a manifest or a folder of studies, resumed, broken, locked, killed.

Tiny untrained bundles (the tiny config, output layer randomised) on synthetic 24x20x10 NIfTI
scans; a real SQLite MLflow store.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_support import one_line_error, runner
from dicom_series import PATIENT_ID, PATIENT_NAME, _stored_volume, _write_series
from mlflow.tracking import MlflowClient
from model_support import TINY

from anomaly_diffusion import tracking
from anomaly_diffusion.cli import app
from anomaly_diffusion.config import load_config
from anomaly_diffusion.data.manifest import ManifestRow, write_manifest
from anomaly_diffusion.diffusion.schedule import make_schedule
from anomaly_diffusion.folder_lock import LOCK_NAME
from anomaly_diffusion.models.bundle import save_bundle
from anomaly_diffusion.models.networks import build_classifier, build_unet
from anomaly_diffusion.usecases import cohort

pytestmark = pytest.mark.slow


AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, 1.5, 0, -20.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])


def save(array: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path


def make_volume(rng: np.random.Generator, lesion: bool, shape: tuple[int, int, int] = (24, 20, 10)) -> np.ndarray:
    """A textured ellipsoid 'brain' on a zero background, with a bright 5x5x4 lesion if asked."""
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = (grid[0] ** 2 / 0.8 + grid[1] ** 2 / 0.7 + grid[2] ** 2 / 1.2) < 1
    image = np.where(brain, 100 + 10 * rng.standard_normal(shape), 0).astype(np.float32)
    if lesion:
        image[10:15, 8:13, 3:7] += 80
    return image


def _bundle(path: Path, channels: int = 1) -> Path:
    """A tiny untrained bundle with `channels` input channels (the UNet's zero-initialised output randomised)."""
    cfg = load_config(TINY, [f"data.image_channels={channels}"])
    torch.manual_seed(0)
    unet = build_unet(cfg.unet, channels)
    torch.nn.init.normal_(unet.out[-1].conv.weight, std=0.1)
    classifier = build_classifier(cfg.classifier, channels)
    schedule = make_schedule(cfg.schedule.kind, cfg.schedule.num_timesteps)
    return save_bundle(path, config=cfg, schedule=schedule, unet=unet, classifier=classifier)


def _studies(folder: Path, n: int, channels: int = 1) -> list[ManifestRow]:
    """n subjects s0.. in folder (s<i>_c<k>.nii.gz, s<i>_mask.nii.gz), a lesion in every other one."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = make_volume(rng, lesion=i % 2 == 0)
        mask = np.zeros(image.shape, np.uint8)
        if i % 2 == 0:
            mask[10:15, 8:13, 3:7] = 1
        images = tuple(save(image * (1 + 0.1 * k), folder / f"s{i}_c{k}.nii.gz") for k in range(channels))
        rows.append(ManifestRow(f"s{i}", "test", images, save(mask, folder / f"s{i}_mask.nii.gz")))
    return rows


def _manifest(folder: Path, n: int = 3) -> Path:
    return write_manifest(_studies(folder, n), folder / "manifest.csv")


def _explain(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, ["explain", *(str(a) for a in args)])
    return result.exit_code, result.output


def _table(out: Path) -> list[dict[str, str]]:
    with (out / "cohort.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _runs(uri: str) -> list:  # type: ignore[type-arg]
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("anomaly_diffusion").experiment_id], max_results=1000)


def _record(out: Path, subject: str) -> dict:  # type: ignore[type-arg]
    return json.loads((out / subject / "study.json").read_text())


def _tracked(out: Path, subject: str) -> bool:
    """The study's record is written and names its child run (the record is replaced atomically)."""
    try:
        return bool(_record(out, subject)["run_id"])
    except (OSError, ValueError):
        return False


def _last_line_error(output: str) -> str:
    """The output ends with exactly one 'error:' line and holds no traceback; returns that line."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]], output
    assert "Traceback" not in output
    return lines[-1]


def test_manifest_cohort_parent_and_child_runs_table_and_resume(tmp_path: Path, tracking_uri: str) -> None:
    manifest = _manifest(tmp_path / "data", 3)
    bundle = _bundle(tmp_path / "bundle.pt")
    out = tmp_path / "out"
    args = (manifest, "--checkpoint", bundle, "--out", out, "--tracking-uri", tracking_uri)
    code, output = _explain(*args)
    assert code == 0, output
    for s in ("s0", "s1", "s2"):
        for name in ("anomaly_map.nii.gz", "healthy.nii.gz", "montage.png", "explain.json"):
            assert (out / s / f"{s}_c0_{name}").is_file()
        image = nib.load(str(out / s / f"{s}_c0_anomaly_map.nii.gz"))
        assert image.shape == (24, 20, 10) and np.isfinite(image.get_fdata()).all()
        assert _record(out, s)["status"] == "done"
    rows = _table(out)
    assert sorted(r["study"] for r in rows) == ["s0", "s1", "s2"]
    scores = [float(r["anomaly_max"]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # most abnormal first
    for r in rows:
        assert r["status"] == "done" and r["error"] == ""
        assert 0 <= float(r["p_healthy_before_min"]) <= 1 and float(r["anomaly_volume_ml"]) >= 0
        assert 0 <= int(r["peak_slice"]) < 10 and float(r["seconds"]) > 0
    printed = output.splitlines()
    header = next(i for i, line in enumerate(printed) if line.startswith("study "))
    assert printed[header + 1].split()[0] == rows[0]["study"]  # the printed table starts with the most abnormal

    runs = _runs(tracking_uri)
    (parent,) = [r for r in runs if r.data.tags["adiff.kind"] == "explain-cohort"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "cohort-manifest"
    assert sorted(c.info.run_name for c in children) == ["s0", "s1", "s2"]
    assert all(c.info.status == "FINISHED" and "anomaly_max" in c.data.metrics for c in children)
    assert {r["run_id"] for r in rows} == {c.info.run_id for c in children}
    assert parent.data.params["noise_level"] == "20" and parent.data.metrics["studies_done"] == 3
    client = MlflowClient(tracking_uri)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"cohort.csv", "cohort_summary.json"}
    assert json.loads(parent.data.tags["mlflow.loggedArtifacts"]) == [{"path": "cohort_summary.json", "type": "table"}]
    table = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "cohort_summary.json", str(tmp_path))).read_text()
    )
    assert [row[0] for row in table["data"]] == [r["study"] for r in rows]
    assert "Most abnormal first" in parent.data.tags["mlflow.note.content"]

    # a rerun skips every complete study, says so, reopens the same parent run and replaces its table
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    code, output = _explain(*args)
    assert code == 0, output
    assert "3 studies already complete in the output folder, skipped" in output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == before
    runs = _runs(tracking_uri)
    assert len(runs) == 4  # no new parent, no new child
    client.download_artifacts(parent.info.run_id, "cohort_summary.json", str(tmp_path / "again"))
    table = json.loads((tmp_path / "again" / "cohort_summary.json").read_text())
    assert len(table["data"]) == 3  # replaced, not appended to
    assert not (out / LOCK_NAME).exists()


def test_broken_studies_are_recorded_and_the_cohort_goes_on(tmp_path: Path, tracking_uri: str) -> None:
    """Folder cohort of a 2-channel model: a missing channel, an unreadable file, a wrong grid; then fixed."""
    data = tmp_path / "data"
    _studies(data, 5, channels=2)
    (data / "s1_c1.nii.gz").unlink()  # a study missing a channel
    good = (data / "s2_c0.nii.gz").read_bytes()
    (data / "s2_c0.nii.gz").write_bytes(good[: len(good) // 2])  # an unreadable file in the middle
    bundle = _bundle(tmp_path / "bundle.pt", channels=2)
    out = tmp_path / "out"
    args = (data, "--channel", "{id}_c0.nii.gz", "--channel", "{id}_c1.nii.gz", "--mask", "{id}_mask.nii.gz")
    args += ("--checkpoint", bundle, "--out", out, "--tracking-uri", tracking_uri)
    code, output = _explain(*args)
    line = _last_line_error(output)
    assert code == 1
    assert line.startswith("error: 2 of 5 studies could not be explained (s1, s2)"), line
    rows = {r["study"]: r for r in _table(out)}
    assert [r["status"] for r in _table(out)] == ["done", "done", "done", "failed", "failed"]  # failed last
    assert "s1_c1.nii.gz: not found (pattern '{id}_c1.nii.gz')" in rows["s1"]["error"]
    assert "s2_c0.nii.gz: truncated or corrupt image data" in rows["s2"]["error"]
    assert "s1: failed:" in output and "s2: failed:" in output
    for s in ("s0", "s3", "s4"):
        assert rows[s]["status"] == "done" and (out / s / f"{s}_c1_healthy.nii.gz").is_file()
    failed = {r.info.run_name: r for r in _runs(tracking_uri) if r.info.status == "FAILED"}
    assert set(failed) == {"s1", "s2"}  # recorded as failed child runs
    assert "truncated or corrupt" in failed["s2"].data.tags["mlflow.note.content"]

    # fixed inputs: only the failed studies are tried again
    save(nib.load(str(data / "s1_c0.nii.gz")).get_fdata().astype(np.float32), data / "s1_c1.nii.gz")
    (data / "s2_c0.nii.gz").write_bytes(good)
    code, output = _explain(*args)
    assert code == 0, output
    assert "3 studies already complete in the output folder, skipped" in output
    assert "2 studies failed before, tried again: s1, s2" in output
    assert all(r["status"] == "done" for r in _table(out))


def _store_text(db: Path) -> str:
    """Every value of every table of the SQLite MLflow store, as text."""
    with sqlite3.connect(db) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        cells = [str(v) for t in tables for row in connection.execute(f'SELECT * FROM "{t}"') for v in row]
    return "\n".join(cells)


def test_a_study_folder_mixing_dicom_series_fails_alone_and_no_identifier_reaches_mlflow(
    tmp_path: Path, tracking_uri: str
) -> None:
    """DICOM studies in folders named by the user; two of them named after the patient (a PACS export)."""
    data = tmp_path / "dicom"
    stored = _stored_volume((24, 20, 6))
    for subject in ("a", PATIENT_NAME, PATIENT_ID):
        _write_series(data / subject / "series", stored)
    _write_series(tmp_path / "other", stored, series_uid="1.2.3.4.9")
    for file in (tmp_path / "other").iterdir():
        file.rename(data / PATIENT_NAME / "series" / f"X{file.name}")  # this folder now mixes two series
    out = tmp_path / "out"
    bundle = _bundle(tmp_path / "bundle.pt")
    code, output = _explain(
        data, "--channel", "{id}/series", "--checkpoint", bundle, "--out", out, "--tracking-uri", tracking_uri
    )
    assert code == 1
    assert _last_line_error(output).startswith(f"error: 1 of 3 studies could not be explained ({PATIENT_NAME})")
    rows = {r["study"]: r for r in _table(out)}  # the local table keeps the user's folder names
    assert rows["a"]["status"] == rows[PATIENT_ID]["status"] == "done"
    assert "2 DICOM series" in rows[PATIENT_NAME]["error"]
    runs = _runs(tracking_uri)
    children = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert children[0] == "a" and all(name.startswith("study-") for name in children[1:]), children
    store = _store_text(Path(tracking_uri.removeprefix("sqlite:///"))).lower()
    artifacts = [p for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()]
    assert any(p.name == "cohort_summary.json" for p in artifacts)
    texts = [gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes() for p in artifacts]
    for value in ("doe", "jane", "778899"):
        assert value not in store, value
        for path, text in zip(artifacts, texts, strict=True):
            assert value.encode() not in text.lower(), (value, path)


def _hold_lock(out: Path) -> subprocess.Popen[str]:
    """Another process holding the output folder's lock until it is killed."""
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom anomaly_diffusion.folder_lock import folder_lock\n"
        f"with folder_lock(Path({str(out)!r}), 'adiff explain cohort'):\n"
        "    print('locked', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_two_cohorts_on_one_folder_and_a_lock_left_by_a_killed_one(tmp_path: Path, tracking_uri: str) -> None:
    manifest = _manifest(tmp_path / "data", 2)
    bundle = _bundle(tmp_path / "bundle.pt")
    out = tmp_path / "out"
    args = (manifest, "--checkpoint", bundle, "--out", out, "--tracking-uri", tracking_uri)
    holder = _hold_lock(out)
    try:
        line = one_line_error(runner.invoke(app, ["explain", *map(str, args)]))
        assert f"another adiff run is writing to this folder (pid {holder.pid} on host" in line, line
        assert "choose another --out" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written beside it
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_NAME).is_file()  # kill -9 left the file, not the lock
    code, output = _explain(*args)
    assert code == 0, output
    assert f"taking over the lock left by pid {holder.pid}" in output
    assert not (out / LOCK_NAME).exists()


def test_kill_9_in_the_middle_of_a_cohort_then_the_rerun_resumes(tmp_path: Path, tracking_uri: str) -> None:
    manifest = _manifest(tmp_path / "data", 6)
    bundle = _bundle(tmp_path / "bundle.pt")
    out = tmp_path / "out"
    args = [str(a) for a in (manifest, "--checkpoint", bundle, "--out", out, "--tracking-uri", tracking_uri)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "anomaly_diffusion.cli", "explain", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not _tracked(out, "s0") and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = [s for s in (f"s{i}" for i in range(6)) if _tracked(out, s)]
    assert 1 <= len(finished) < 6, finished  # killed in the middle
    code, output = _explain(*args)
    assert code == 0, output
    assert f"already complete in the output folder, skipped (--overwrite explains them again): {finished[0]}" in output
    rows = _table(out)
    assert len(rows) == 6 and all(r["status"] == "done" for r in rows)
    for s in (f"s{i}" for i in range(6)):
        assert not [p.name for p in (out / s).iterdir() if p.name.startswith(".")]  # no half-written leftovers
        assert np.isfinite(nib.load(str(out / s / f"{s}_c0_anomaly_map.nii.gz")).get_fdata()).all()
    runs = _runs(tracking_uri)
    (parent,) = [r for r in runs if r.data.tags["adiff.kind"] == "explain-cohort"]  # the same one, reopened
    assert parent.info.status == "FINISHED"
    assert {r["run_id"] for r in rows} <= {r.info.run_id for r in runs if r.info.status == "FINISHED"}
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the killed study's run, if any: KILLED


def test_partial_study_is_explained_again_other_settings_refused_and_overwrite_redoes_all(
    tmp_path: Path, tracking_uri: str
) -> None:
    manifest = _manifest(tmp_path / "data", 3)
    bundle = _bundle(tmp_path / "bundle.pt")
    out = tmp_path / "out"
    args = (manifest, "--checkpoint", bundle, "--out", out, "--tracking-uri", tracking_uri)
    code, output = _explain(*args)
    assert code == 0, output
    first_parent = json.loads((out / "cohort.json").read_text())["parent_run_id"]
    # a kill between the outputs and the record: s1's outputs without a record, a temporary file beside them
    (out / "s1" / "study.json").unlink()
    (out / "s1" / ".s1_c0_anomaly_map.nii.gz.x1y2.nii.gz").write_bytes(b"half")
    kept = (out / "s0" / "s0_c0_anomaly_map.nii.gz").stat().st_mtime_ns
    code, output = _explain(*args)
    assert code == 0, output
    assert "1 study explained again: s1 (left incomplete)" in output
    assert "2 studies already complete in the output folder, skipped" in output
    assert _record(out, "s1")["status"] == "done"
    assert not (out / "s1" / ".s1_c0_anomaly_map.nii.gz.x1y2.nii.gz").exists()
    assert (out / "s0" / "s0_c0_anomaly_map.nii.gz").stat().st_mtime_ns == kept

    # other settings into the same folder: refused, nothing touched
    line = one_line_error(runner.invoke(app, ["explain", *map(str, args), "--noise-level", "30"]))
    assert "holds studies explained with noise_level=20" in line and "--overwrite" in line, line
    assert (out / "s0" / "s0_c0_anomaly_map.nii.gz").stat().st_mtime_ns == kept

    code, output = _explain(*args, "--noise-level", "30", "--overwrite")
    assert code == 0, output
    assert "skipped (--overwrite" not in output and "3 explained" in output
    assert all(_record(out, s)["settings"]["noise_level"] == 30 for s in ("s0", "s1", "s2"))
    assert (out / "s0" / "s0_c0_anomaly_map.nii.gz").stat().st_mtime_ns != kept
    new_parent = json.loads((out / "cohort.json").read_text())["parent_run_id"]
    assert new_parent != first_parent  # the earlier cohort's run stays as it was
    parents = {r.info.run_id for r in _runs(tracking_uri) if r.data.tags["adiff.kind"] == "explain-cohort"}
    assert parents == {first_parent, new_parent}


def _lock_store(uri: str) -> sqlite3.Connection:
    """Another writer holding the SQLite store: an open exclusive transaction."""
    connection = sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
    connection.execute("BEGIN EXCLUSIVE")
    return connection


def test_an_mlflow_store_locked_by_another_writer(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path / "data", 3)
    bundle = _bundle(tmp_path / "bundle.pt")
    out = tmp_path / "out"
    args = (manifest, "--checkpoint", bundle, "--out", out, "--tracking-uri", tracking_uri)
    monkeypatch.setattr(tracking, "LOCK_PATIENCE_S", 1.0)
    MlflowClient(tracking_uri).search_experiments()  # the store exists
    holder = _lock_store(tracking_uri)
    line = one_line_error(runner.invoke(app, ["explain", *map(str, args)]))  # locked from the start
    assert f"MLflow store {tracking_uri} is locked by another writer" in line, line
    assert not (out / "s0").exists()
    holder.rollback()
    holder.close()

    # locked after the second study is explained, before it is tracked
    real, explained = cohort.explain_study, []
    holders: list[sqlite3.Connection] = []

    def explain_then_lock(*a: object, **k: object) -> object:
        result = real(*a, **k)  # type: ignore[arg-type]
        explained.append(Path(a[2]).name)  # type: ignore[arg-type]
        if len(explained) == 2:
            holders.append(_lock_store(tracking_uri))
        return result

    monkeypatch.setattr(cohort, "explain_study", explain_then_lock)
    code, output = _explain(*args)
    assert code == 1
    assert "is locked by another writer" in _last_line_error(output)
    assert explained == ["s0", "s1"]
    assert _record(out, "s0")["run_id"] and _record(out, "s1")["run_id"] is None  # s1's outputs kept, untracked
    assert (out / "s1" / "s1_c0_anomaly_map.nii.gz").is_file() and not (out / "s2").exists()
    holders[0].rollback()
    holders[0].close()

    explained.clear()
    code, output = _explain(*args)
    assert code == 0, output
    assert explained == ["s2"]  # s1 is not explained again, only logged
    assert "1 study explained before, only logged into this cohort's MLflow run: s1" in output
    runs = _runs(tracking_uri)
    (parent,) = [r for r in runs if r.data.tags["adiff.kind"] == "explain-cohort"]
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert children == {"s0", "s1", "s2"} and parent.info.status == "FINISHED"
    assert all(_record(out, s)["run_id"] for s in ("s0", "s1", "s2"))


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: [d / "s0_c0.nii.gz", "--channel", "{id}.nii.gz"], "--channel patterns need one folder"),
        (lambda d: [d, "--channel", "c0.nii.gz"], "must contain {id} exactly once"),
        (lambda d: [d / "manifest.csv", "--mask", d / "s0_mask.nii.gz"], "come from the manifest's mask/brainmask"),
        (lambda d: [d / "manifest.csv", d / "s0_c0.nii.gz"], "a manifest is explained on its own"),
        (lambda d: [d], "a folder of NIfTI files, not a DICOM series"),
        (lambda d: [d, "--channel", "{id}_t9.nii.gz"], "nothing matches '{id}_t9.nii.gz'"),
    ],
)
def test_cohort_arguments_that_cannot_work(tmp_path: Path, make_args: object, message: str) -> None:
    data = tmp_path / "data"
    _manifest(data, 1)
    bundle = _bundle(tmp_path / "bundle.pt")
    extra = [str(a) for a in make_args(data)]  # type: ignore[operator]
    result = runner.invoke(app, ["explain", *extra, "--checkpoint", str(bundle), "--out", str(tmp_path / "out")])
    assert message in one_line_error(result)


def test_torchrun_explains_each_study_once_and_rank_0_writes_the_summary(tmp_path: Path, tracking_uri: str) -> None:
    manifest = _manifest(tmp_path / "data", 4)
    bundle = _bundle(tmp_path / "bundle.pt")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "anomaly_diffusion.cli", "explain", str(manifest), "--checkpoint", str(bundle)]
    command += ["--out", str(out), "--tracking-uri", tracking_uri]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("mlflow parent run:") == 1 and "on 2 processes" in done.stdout
    ranks = {s: _record(out, s)["rank"] for s in ("s0", "s1", "s2", "s3")}
    assert ranks == {"s0": 0, "s1": 1, "s2": 0, "s3": 1}  # each study once, every other one per rank
    assert len(_table(out)) == 4
    runs = _runs(tracking_uri)
    (parent,) = [r for r in runs if r.data.tags["adiff.kind"] == "explain-cohort"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.run_name for c in children) == ["s0", "s1", "s2", "s3"]
    assert parent.data.tags["adiff.world_size"] == "2"


def test_review_slices_reaches_every_study_of_a_cohort(tmp_path: Path, tracking_uri: str) -> None:
    manifest = _manifest(tmp_path / "data", 2)
    bundle = _bundle(tmp_path / "bundle.pt")
    code, output = _explain(
        manifest,
        "--checkpoint",
        bundle,
        "--out",
        tmp_path / "out",
        "--tracking-uri",
        tracking_uri,
        "--review-slices",
        "2",
    )
    assert code == 0, output
    client = MlflowClient(tracking_uri)
    children = [r for r in _runs(tracking_uri) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    for child in children:
        logged = [a.path for a in client.list_artifacts(child.info.run_id, "images")]
        steps = {p.split("+step+")[1].split("+")[0] for p in logged if p.startswith("images/review~1_input+step+")}
        assert len(steps) == 2, logged  # the cap of 2, not the default 200 (the volumes have 10 slices)
