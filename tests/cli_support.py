"""Shared pieces of the CLI tests: the runner, a tiny trained bundle, the one-line error check."""

from __future__ import annotations

from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from anomaly_diffusion.cli import app

runner = CliRunner()


def train_tiny(tmp_path: Path, manifest: Path, uri: str, *extra: str) -> Path:
    """Train the tiny config through the CLI; returns the bundle path."""
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
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
            "tiny-train",
            *extra,
        ],
    )
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
