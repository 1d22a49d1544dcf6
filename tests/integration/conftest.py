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


@pytest.fixture
def tiny_2d_dataset(tmp_path: Path) -> Path:
    """Eight grey 2D PNG 'X-rays' (label column; the pathological ones have a bright spot); returns the manifest."""
    import numpy as np
    from skimage import io as skio

    from anomaly_diffusion.data.manifest import ManifestRow, write_manifest

    rng = np.random.default_rng(0)
    folder = tmp_path / "xrays"
    folder.mkdir()
    rows = []
    for i, split in enumerate(["train"] * 6 + ["val", "test"]):
        image = np.zeros((30, 26), np.uint8)
        image[5:25, 4:22] = rng.integers(80, 140, (20, 18))
        label = i % 2
        if label:
            image[12:16, 10:14] = 230
        skio.imsave(folder / f"x{i}.png", image, check_contrast=False)
        rows.append(ManifestRow(subject=f"x{i}", split=split, images=(folder / f"x{i}.png",), label=label))  # type: ignore[arg-type]
    return write_manifest(rows, folder / "manifest.csv")


@pytest.fixture
def bundle_2d(tmp_path: Path, tiny_2d_dataset: Path, tracking_uri: str) -> Path:
    """The tiny config trained on 2D images (`bundle` is trained on 3D volumes)."""
    return train_tiny(tmp_path, tiny_2d_dataset, tracking_uri)
