"""`adiff ui` serves the store on 127.0.0.1; a real headless Chromium renders an explain run's page."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from cli_support import runner, ui_server
from mlflow.tracking import MlflowClient

from anomaly_diffusion.cli import app
from anomaly_diffusion.tracking import tracked_run

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
]


def test_ui_serves_the_store_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with tracked_run(uri, "anomaly_diffusion", "a-run", "train") as run:
        run.log_metrics({"ddpm_loss": 0.5}, 1)
    with ui_server(uri) as url:
        query = f"{url}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=anomaly_diffusion"
        with urllib.request.urlopen(query, timeout=10) as response:
            assert json.loads(response.read())["experiment"]["name"] == "anomaly_diffusion"


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI") == "true":
        pytest.fail("Chromium is missing in CI: .ci/run must install Debian's chromium package")
    return found


def _dump_dom(browser: str, url: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_explain_run_page_in_headless_chromium(
    tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str
) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); CI installs it and runs this test")
    result = runner.invoke(
        app,
        [
            "explain",
            str(tiny_dataset.parent / "s5_t1.nii.gz"),
            "--checkpoint",
            str(bundle),
            "--out",
            str(tmp_path / "explain"),
            "--tracking-uri",
            tracking_uri,
        ],
    )
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("anomaly_diffusion")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "explain-s5_t1"]
    with ui_server(tracking_uri) as url:
        page = f"{url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
        overview = _dump_dom(browser, page)
        assert "explain-s5_t1" in overview
        assert "p_healthy_before_mean" in overview and "anomaly_volume_ml" in overview
        artifacts = _dump_dom(browser, f"{page}/artifacts/explain/s5_t1_montage.png")
        assert '<img alt="explain/s5_t1_montage.png"' in artifacts  # the PNG preview is rendered


def test_ui_stopped_by_sigterm_stops_serving(tmp_path: Path) -> None:
    """SIGTERM to `adiff ui` alone (as a service manager sends it) ends mlflow's server and workers too."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with tracked_run(uri, "anomaly_diffusion", "a-run", "train"):
        pass
    with ui_server(uri, stop_signal=signal.SIGTERM, whole_group=False) as url:
        pass
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                time.sleep(0.5)
        except OSError:
            break
    else:
        raise AssertionError(f"{url} still answers after adiff ui got SIGTERM")
