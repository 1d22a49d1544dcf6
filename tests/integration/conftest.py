"""Fixtures of the CLI tests: run in tmp_path, and a tiny trained bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_support import train_tiny


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # default outputs (adiff_runs/, mlruns.db) land in tmp, never in the repo


@pytest.fixture
def bundle(tmp_path: Path, tiny_dataset: Path, tracking_uri: str) -> Path:
    return train_tiny(tmp_path, tiny_dataset, tracking_uri)
