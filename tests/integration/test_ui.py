"""`adiff ui` serves the store on 127.0.0.1; headless Chromium renders an explain run's page and its slice review."""

from __future__ import annotations

import json
import os
import re
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
from anomaly_diffusion.usecases.explain import REVIEW_KEYS

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
    printed: list[str] = []
    with ui_server(uri, printed=printed) as url:
        query = f"{url}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=anomaly_diffusion"
        with urllib.request.urlopen(query, timeout=10) as response:
            experiment = json.loads(response.read())["experiment"]
    assert experiment["name"] == "anomaly_diffusion"
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    # it sends people to the experiment's runs in the model-training view (MLflow 3.17 opens GenAI otherwise)
    assert f"{url}/#/experiments/{experiment['experiment_id']}?workflowType=machine_learning" in printed[0]


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
    steps = sorted(
        int(m["step"])
        for a in client.list_artifacts(run.info.run_id, "images")
        if (m := re.search(r"\+step\+(?P<step>\d+)\+", a.path)) and "review~3_map" in a.path
    )
    assert steps
    printed: list[str] = []
    with ui_server(tracking_uri, printed=printed) as url:
        landing = _dump_dom(browser, re.search(r"http://\S+", printed[0]).group(0))  # type: ignore[union-attr]
        assert "explain-s5_t1" in landing and "Evaluation runs" not in landing  # the model-training runs list
        page = f"{url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
        overview = _dump_dom(browser, page)
        assert "explain-s5_t1" in overview
        assert "p_healthy_before_mean" in overview and "anomaly_volume_ml" in overview
        # the description, where a reviewer lands, points to the slice review and shows the montage
        assert "Slice review" in overview
        assert 'src="get-artifact?path=explain/s5_t1_montage.png' in overview
        artifacts = _dump_dom(browser, f"{page}/artifacts/explain/s5_t1_montage.png")
        assert '<img alt="explain/s5_t1_montage.png"' in artifacts  # the PNG preview is rendered
        # the Model metrics tab: a "review" section, one image chart per view, each with a step slider
        # spanning the explained slices (MLflow 3.17 opens the charts at step 0, until the slider moves)
        review = _dump_dom(browser, f"{page}/model-metrics?workflowType=machine_learning")
        for key in REVIEW_KEYS:
            assert key in review
        sliders = re.findall(r'<span role="slider"[^>]*>', review)
        assert len(sliders) >= len(REVIEW_KEYS)
        for slider in sliders[: len(REVIEW_KEYS)]:
            assert f'aria-valuemin="{steps[0]}"' in slider and f'aria-valuemax="{steps[-1]}"' in slider


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
