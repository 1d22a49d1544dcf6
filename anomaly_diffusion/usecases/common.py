"""Pieces every use case shares: packaged configs, run names, finding and loading a model bundle."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

from anomaly_diffusion.errors import CheckpointError
from anomaly_diffusion.models.bundle import ModelBundle, load_bundle
from anomaly_diffusion.runtime import resolve_device
from anomaly_diffusion.tracking import MODELS_PREFIX, fetch_registered_bundle, newest_trained_bundle

PACKAGED_CONFIGS = ("default", "demo", "tiny")
BUNDLE_ROOT = Path("adiff_runs")
"""Where `adiff explain` and `adiff evaluate` look for the newest bundle without `--checkpoint` (and in the store)."""


def resolve_config_path(name: str | None) -> Path | None:
    """A config file path, or the name of a config shipped with the package ('default', 'demo', 'tiny').

    A file of that name in the current folder wins over the packaged config; a folder does not
    (the demo's own work folder is called `adiff_demo`, but users pass `--work-dir demo`).
    """
    if name is None:
        return None
    path = Path(name)
    if path.is_file() or name not in PACKAGED_CONFIGS:
        return path
    return packaged_config(name)


def packaged_config(name: str) -> Path:
    """The path of a config shipped with the package ('default', 'demo', 'tiny')."""
    return Path(str(resources.files("anomaly_diffusion.configs") / f"{name}.yaml"))


def timestamped(prefix: str) -> str:
    """A run name like 'train-20261122-081500'."""
    return f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def output_stem(path: Path) -> str:
    """'scan.nii.gz' -> 'scan', 'scan.hdr' -> 'scan', 'xray.png' -> 'xray'; a DICOM folder -> its name."""
    suffixes = r"nii|nii\.gz|hdr|img|nrrd|nhdr|mha|mhd|png|jpe?g|tiff?|bmp|npy|dcm"
    return re.sub(rf"\.({suffixes})$", "", path.name, flags=re.IGNORECASE)


@dataclass(frozen=True)
class FoundBundle:
    """The bundle `adiff explain`/`evaluate` use without --checkpoint, and where it was found (for people)."""

    path: Path
    origin: str


def find_latest_bundle(tracking_uri: str | None, download: Path, root: Path = BUNDLE_ROOT) -> FoundBundle:
    """The newest bundle: `root/*/bundle.pt` by modification time, or the bundle of the newest
    finished training run in the tracking store (`adiff demo` and `--out` elsewhere train outside
    `root`), whichever is newer. Remote artifacts are downloaded into `download`.

    Raises:
        CheckpointError: neither has one.
    """
    local = sorted(root.glob("*/bundle.pt"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    stored = newest_trained_bundle(tracking_uri, download) if tracking_uri else None
    if local and (stored is None or local[-1].stat().st_mtime >= stored.finished):
        return FoundBundle(local[-1], f"the newest bundle under {root}/")
    if stored is not None:
        finished = datetime.fromtimestamp(stored.finished).strftime("%Y-%m-%d %H:%M")
        return FoundBundle(
            stored.path,
            f"the newest training run in {tracking_uri}: {stored.run_name} ({stored.run_id}, finished {finished})",
        )
    where = f"under {root}/" + (f" or in the tracking store {tracking_uri}" if tracking_uri else "")
    raise CheckpointError(f"no --checkpoint given and no trained bundle found {where}; pass --checkpoint PATH")


def load_model(
    model: Path | str | None,
    tracking_uri: str,
    device: str = "auto",
    announce: Callable[[str], None] | None = None,
) -> tuple[ModelBundle, str, str | None]:
    """A bundle from a file or a registered model (`models:/NAME/VERSION`, `models:/NAME@ALIAS`).

    `model` None takes `find_latest_bundle` and tells `announce` which one it took.

    Returns:
        (bundle, file name, 'NAME/VERSION' for a registered model or None).
    """
    with tempfile.TemporaryDirectory(prefix="adiff-model-") as download:
        if model is None:
            found = find_latest_bundle(tracking_uri, Path(download))
            if announce is not None:
                announce(f"model: {found.path} ({found.origin})")
            model = found.path
        if str(model).startswith(MODELS_PREFIX):
            path, model_ref = fetch_registered_bundle(tracking_uri, str(model), Path(download))
        else:
            path, model_ref = Path(model), None
        return load_bundle(path, resolve_device(device)), path.name, model_ref
