"""Shared pieces of the CLI tests: the runner, a tiny trained bundle, the one-line error check."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from anomaly_diffusion.cli import app
from anomaly_diffusion.tracking import free_port

runner = CliRunner()


def tiny_train_args(manifest: Path, out: Path, uri: str, run_name: str = "tiny-train", *extra: str) -> list[str]:
    """`adiff train` arguments for the tiny config on a manifest (extra options last)."""
    return [
        "train",
        "--config",
        "tiny",
        "--set",
        f"data.manifest={manifest}",
        "--set",
        "data.min_foreground_fraction=0",
        "--out",
        str(out),
        "--tracking-uri",
        uri,
        "--run-name",
        run_name,
        *extra,
    ]


def train_tiny(tmp_path: Path, manifest: Path, uri: str, *extra: str) -> Path:
    """Train the tiny config through the CLI; returns the bundle path."""
    out = tmp_path / "run"
    result = runner.invoke(app, tiny_train_args(manifest, out, uri, "tiny-train", *extra))
    assert result.exit_code == 0, result.output
    assert (out / "bundle.pt").is_file()
    return out / "bundle.pt"


def one_line_error(result: Result) -> str:
    """Assert exit code 1 and exactly one output line, 'error: ...', no traceback; return it."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


@contextmanager
def ui_server(
    uri: str,
    first_port: int = 5800,
    stop_signal: int = signal.SIGINT,
    whole_group: bool = True,
    printed: list[str] | None = None,
) -> Iterator[str]:
    """Run `adiff ui` in its own process group until the block ends; yields its base URL once it answers.

    At the end `stop_signal` goes to the whole group (as Ctrl-C in a terminal) or to `adiff ui` alone.
    `printed`, if given, receives the line `adiff ui` printed first (the URL it sends people to).
    """
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "anomaly_diffusion.cli",
            "ui",
            "--port",
            str(free_port(first_port)),
            "--tracking-uri",
            uri,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        if printed is not None:
            printed.append(first)
        found = re.search(r"http://127\.0\.0\.1:\d+", first)
        assert found, first
        # drain the rest (mlflow's server logs share the pipe): a full pipe would block `adiff ui` on a write
        threading.Thread(target=process.stdout.read, daemon=True).start()
        url = found.group(0)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("adiff ui did not answer within 90 s")
        yield url
        if whole_group:
            os.killpg(process.pid, stop_signal)
        else:
            os.kill(process.pid, stop_signal)
        assert process.wait(timeout=30) in (0, 130, -stop_signal)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
