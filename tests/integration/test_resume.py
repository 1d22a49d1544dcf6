"""kill -9 during `adiff train`, then `adiff train --resume`: same final state, same MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from anomaly_diffusion.models.bundle import read_bundle_file

STEPS = ["--set", "train.ddpm_steps=60", "--set", "train.classifier_steps=30", "--set", "train.checkpoint_every=10"]
STEPS += ["--set", "train.log_every=5", "--set", "data.min_foreground_fraction=0"]


def _train(manifest: Path, out: Path, uri: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "anomaly_diffusion.cli",
        "train",
        "--config",
        "tiny",
        "--set",
        f"data.manifest={manifest}",
        *STEPS,
        "--out",
        str(out),
        "--tracking-uri",
        uri,
        *extra,
    ]


def test_resume_after_sigkill_reaches_the_same_weights_in_the_same_run(tmp_path: Path, tiny_dataset: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "killed"
    process = subprocess.Popen(
        _train(tiny_dataset, out, uri, "--run-name", "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoint = out / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists() and read_bundle_file(checkpoint)["extra"]["step"] >= 20:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    state = read_bundle_file(checkpoint)
    assert state["extra"]["complete"] is False and not (out / "bundle.pt").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "anomaly_diffusion.cli", "train", "--resume", str(out), "--tracking-uri", uri],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not checkpoint.exists()

    reference = subprocess.run(
        _train(tiny_dataset, tmp_path / "straight", uri, "--run-name", "straight"), capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr
    a = read_bundle_file(out / "bundle.pt")
    b = read_bundle_file(tmp_path / "straight" / "bundle.pt")
    for part in ("unet", "classifier"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)

    client = MlflowClient(uri)
    runs = {
        r.info.run_name: r
        for r in client.search_runs([client.get_experiment_by_name("anomaly_diffusion").experiment_id])
    }
    assert set(runs) == {"killed", "straight"}  # the resumed training continued its own run
    killed = runs["killed"]
    assert killed.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "ddpm_loss")]
    assert max(steps) == 60 and set(range(5, 61, 5)) <= set(steps)
    assert [a.path for a in client.list_artifacts(killed.info.run_id, "model")] == ["model/bundle.pt"]


def test_resume_refuses_a_finished_run_and_another_config(tmp_path: Path, tiny_dataset: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "run"
    assert subprocess.run(_train(tiny_dataset, out, uri), capture_output=True).returncode == 0
    again = subprocess.run(
        [sys.executable, "-m", "anomaly_diffusion.cli", "train", "--resume", str(out)], capture_output=True, text=True
    )
    assert again.returncode == 1 and "already finished" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path: Path, tiny_dataset: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "run"
    assert subprocess.run(_train(tiny_dataset, out, uri), capture_output=True).returncode == 0
    data = torch.load(out / "bundle.pt", weights_only=True)
    torch.save({**data, "train_state": {}}, out / "checkpoint.pt")  # as if killed at the very end
    (out / "bundle.pt").unlink()
    other = subprocess.run(
        [
            sys.executable,
            "-m",
            "anomaly_diffusion.cli",
            "train",
            "--resume",
            str(out),
            "--config",
            "tiny",
            "--set",
            f"data.manifest={tiny_dataset}",
            "--set",
            "train.ddpm_steps=99",
        ],
        capture_output=True,
        text=True,
    )
    assert other.returncode == 1 and "checkpoint is from another config" in other.stderr
    assert "train.ddpm_steps" in other.stderr and len(other.stderr.strip().splitlines()) == 1


def test_a_finished_training_trains_on_to_more_steps_as_if_run_straight(tmp_path: Path, tiny_dataset: Path) -> None:
    """2000 -> 4000 DDPM steps by resuming: the same weights as one 4000-step run, in the same MLflow run."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "run"
    assert subprocess.run(_train(tiny_dataset, out, uri, "--run-name", "extended"), capture_output=True).returncode == 0
    assert (out / "train_state.pt").is_file() and not (out / "checkpoint.pt").exists()
    resume = [sys.executable, "-m", "anomaly_diffusion.cli", "train", "--resume", str(out), "--tracking-uri", uri]
    shorter = subprocess.run([*resume, "--set", "train.ddpm_steps=40"], capture_output=True, text=True)
    assert shorter.returncode == 1 and "only to more steps" in shorter.stderr
    other = subprocess.run([*resume, "--set", "train.ddpm_lr=0.1"], capture_output=True, text=True)
    assert other.returncode == 1 and "another config (differs in train.ddpm_lr)" in other.stderr
    longer = subprocess.run([*resume, "--set", "train.ddpm_steps=90"], capture_output=True, text=True)
    assert longer.returncode == 0, longer.stderr

    straight = tmp_path / "straight"
    reference = _train(tiny_dataset, straight, uri, "--run-name", "straight", "--set", "train.ddpm_steps=90")
    assert subprocess.run(reference, capture_output=True).returncode == 0
    a, b = read_bundle_file(out / "bundle.pt"), read_bundle_file(straight / "bundle.pt")
    assert a["config"]["train"]["ddpm_steps"] == 90
    for part in ("unet", "classifier"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("anomaly_diffusion").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert set(runs) == {"extended", "straight"}
    extended = runs["extended"]
    assert extended.data.tags["train.extended_to"] == "ddpm 90, classifier 30"
    steps = {m.step for m in client.get_metric_history(extended.info.run_id, "ddpm_loss")}
    assert set(range(5, 91, 5)) <= steps
