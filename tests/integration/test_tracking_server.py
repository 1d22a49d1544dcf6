"""Train against a real `mlflow server` on 127.0.0.1 (a team tracking server), checked through MlflowClient."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cli_support import train_tiny
from mlflow.tracking import MlflowClient

from anomaly_diffusion.tracking import free_port

pytestmark = pytest.mark.slow


def test_train_logs_to_a_tracking_server_with_proxied_artifacts(tmp_path: Path, tiny_dataset: Path) -> None:
    port = free_port(5900)
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--workers", "1"]
    command += ["--serve-artifacts", "--artifacts-destination", str(tmp_path / "server_artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise AssertionError("mlflow server did not start") from None
                time.sleep(1)
        bundle = train_tiny(tmp_path, tiny_dataset, url)
        assert bundle.is_file()
        client = MlflowClient(url)
        (run,) = client.search_runs([client.get_experiment_by_name("anomaly_diffusion").experiment_id])
        assert run.info.status == "FINISHED" and run.info.run_name == "tiny-train"
        assert "ddpm_loss" in run.data.metrics and run.data.params["data.image_size"] == "16"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert "model/bundle.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        # the artifacts live on the server's side, not in the client's folder
        assert list((tmp_path / "server_artifacts").rglob("bundle.pt"))
        assert not (tmp_path / "mlartifacts").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
