"""`adiff inspect`: load every volume of a manifest as training would and summarise it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anomaly_diffusion.config import Config
from anomaly_diffusion.data.datasets import VolumeInfo, load_slices
from anomaly_diffusion.data.manifest import read_manifest


@dataclass(frozen=True)
class DatasetReport:
    """What `adiff inspect` prints: per-split counts and per-volume facts."""

    splits: dict[str, dict[str, int]]
    volumes: tuple[VolumeInfo, ...]


def inspect_dataset(manifest: Path, cfg: Config, progress: Callable[[int, int], None] | None = None) -> DatasetReport:
    """Load every volume of a manifest as training would; refuse inconsistent data with one line."""
    rows = read_manifest(manifest)
    splits: dict[str, dict[str, int]] = {}
    volumes: list[VolumeInfo] = []
    for split in ("train", "val", "test"):
        split_rows = [r for r in rows if r.split == split]
        if split_rows:
            data = load_slices(split_rows, cfg.data, progress)
            splits[split] = data.summary()
            volumes.extend(data.volumes)
    return DatasetReport(splits, tuple(volumes))
