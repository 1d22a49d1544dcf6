"""Without --checkpoint, explain takes the newest bundle: under ./adiff_runs or of the tracking store's
newest finished training run (which is where `adiff demo` and `adiff train --out ...` put theirs)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from cli_support import one_line_error, runner
from mlflow.tracking import MlflowClient

from anomaly_diffusion.cli import app
from anomaly_diffusion.errors import CheckpointError
from anomaly_diffusion.tracking import tracked_run
from anomaly_diffusion.usecases.common import find_latest_bundle


def test_explain_without_checkpoint_takes_the_stores_newest_training_run_and_says_so(
    tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str
) -> None:
    assert not (tmp_path / "adiff_runs").exists()  # trained with --out elsewhere, as the demo does
    scan = tiny_dataset.parent / "s5_t1.nii.gz"
    result = runner.invoke(app, ["explain", str(scan), "--out", str(tmp_path / "x"), "--tracking-uri", tracking_uri])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("anomaly_diffusion").experiment_id
    (train,) = [r for r in client.search_runs([experiment]) if r.info.run_name == "tiny-train"]
    assert f"the newest training run in {tracking_uri}: tiny-train ({train.info.run_id}, finished" in result.output
    assert f"{train.info.run_id}/artifacts/model/bundle.pt" in result.output  # the store's own copy, not a download
    explain = next(r for r in client.search_runs([train.info.experiment_id]) if r.data.tags["adiff.kind"] == "explain")
    assert explain.data.tags["adiff.train_run_id"] == train.info.run_id


def test_the_newer_of_adiff_runs_and_the_store_wins(tmp_path: Path, bundle: Path, tracking_uri: str) -> None:
    local = tmp_path / "adiff_runs" / "old" / "bundle.pt"
    local.parent.mkdir(parents=True)
    shutil.copy(bundle, local)
    past, future = time.time() - 3600, time.time() + 3600
    os.utime(local, (past, past))
    found = find_latest_bundle(tracking_uri, tmp_path / "download", tmp_path / "adiff_runs")
    assert found.path != local and found.path.name == "bundle.pt" and "tiny-train" in found.origin
    os.utime(local, (future, future))
    found = find_latest_bundle(tracking_uri, tmp_path / "download", tmp_path / "adiff_runs")
    assert found.path == local and "adiff_runs" in found.origin


def test_a_newer_training_run_without_its_bundle_is_skipped(tmp_path: Path, bundle: Path, tracking_uri: str) -> None:
    with tracked_run(tracking_uri, "anomaly_diffusion", "crashed-before-saving", "train"):
        pass  # FINISHED, but no model/bundle.pt artifact
    with tracked_run(tracking_uri, "another_experiment", "no-artifact-either", "train"):
        pass
    found = find_latest_bundle(tracking_uri, tmp_path / "download", tmp_path / "adiff_runs")
    assert "tiny-train" in found.origin


def test_no_bundle_anywhere_is_one_line_and_creates_no_store(
    tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    scan = tiny_dataset.parent / "s5_t1.nii.gz"
    line = one_line_error(runner.invoke(app, ["explain", str(scan)]))
    assert "no trained bundle found under adiff_runs/ or in the tracking store sqlite:///mlruns.db" in line
    assert not (tmp_path / "mlruns.db").exists()
    with pytest.raises(CheckpointError):
        find_latest_bundle(f"sqlite:///{tmp_path / 'missing.db'}", tmp_path, tmp_path / "adiff_runs")
    assert not (tmp_path / "missing.db").exists()
