"""`adiff ui` serves the MLflow UI for the store on 127.0.0.1 and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from anomaly_diffusion.tracking import free_port, tracked_run


def test_ui_serves_the_store_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with tracked_run(uri, "anomaly_diffusion", "a-run", "train") as run:
        run.log_metrics({"ddpm_loss": 0.5}, 1)
    port = free_port(5800)
    process = subprocess.Popen(
        [sys.executable, "-m", "anomaly_diffusion.cli", "ui", "--port", str(port), "--tracking-uri", uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", first)
        assert url, first
        deadline, body = time.time() + 90, ""
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(
                    f"{url.group(0)}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=anomaly_diffusion",
                    timeout=5,
                ) as response:
                    body = response.read().decode()
                break
            except OSError:
                time.sleep(1)
        assert '"name": "anomaly_diffusion"' in body or '"name":"anomaly_diffusion"' in body, body
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) in (0, 130, -signal.SIGINT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
