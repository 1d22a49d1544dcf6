"""The model bundle: the networks' weights + resolved config + schedule + package version.

A classifier-guidance bundle (`method: classifier`) holds the UNet and the classifier; a
classifier-free one (`method: classifier_free`) only the label-conditional UNet (`classifier` None).

A bundle is a plain dict of tensors and primitives, written atomically with `torch.save` and
read with `torch.load(weights_only=True)`, so loading one never runs pickled code.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomaly_diffusion import __version__
from anomaly_diffusion.config import Config, config_from_dict
from anomaly_diffusion.diffusion.schedule import NoiseSchedule
from anomaly_diffusion.errors import CheckpointError, ConfigError
from anomaly_diffusion.files import atomic_write_bytes
from anomaly_diffusion.models.networks import NoiseAwareClassifier, build_classifier, build_unet

BUNDLE_FORMAT = "anomaly_diffusion.bundle"
BUNDLE_VERSION = 1


@dataclass
class ModelBundle:
    """Everything explain needs, rebuilt from a bundle file."""

    config: Config
    schedule: NoiseSchedule
    unet: nn.Module
    classifier: NoiseAwareClassifier | None
    package_version: str
    train_run_id: str | None
    extra: dict[str, Any]


def atomic_torch_save(obj: object, path: Path) -> None:
    """torch.save into memory, then the bytes to a temporary file in the target folder and a rename: never a
    half-written file. In memory first because torch's own file writer turns a full disk into a
    RuntimeError ('unexpected pos ...') without its errno; a plain write raises `NoSpaceError`, with the
    bytes the checkpoint needs."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getbuffer(), path)


def bundle_dict(
    config: Config,
    schedule: NoiseSchedule,
    unet: nn.Module,
    classifier: nn.Module | None,
    train_run_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The bundle as plain data (tensors on CPU)."""
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "package_version": __version__,
        "config": config.model_dump(mode="json"),
        "schedule": schedule.to_dict(),
        "unet": {k: v.detach().cpu() for k, v in unet.state_dict().items()},
        "classifier": None if classifier is None else {k: v.detach().cpu() for k, v in classifier.state_dict().items()},
        "train_run_id": train_run_id,
        "extra": extra or {},
    }


def save_bundle(path: Path, **kwargs: Any) -> Path:
    """Write a bundle atomically (arguments as `bundle_dict`)."""
    atomic_torch_save(bundle_dict(**kwargs), path)
    return path


def read_bundle_file(path: Path) -> dict[str, Any]:
    """Load a bundle file safely as plain data, with one-line errors."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a bundle file (bundle.pt)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: refused: the file needs pickled code to load (not allowed with weights_only=True); "
                "only adiff bundles are accepted"
            ) from exc
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch weights file)") from exc
    except Exception as exc:  # torch.load fails on foreign bytes with many types (IndexError seen on CSV)
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{path}: not an adiff model bundle")
    if data.get("format_version") != BUNDLE_VERSION:
        raise CheckpointError(
            f"{path}: bundle format version {data.get('format_version')} is not supported (expected {BUNDLE_VERSION})"
        )
    return data


def load_bundle(path: Path, device: torch.device | str = "cpu") -> ModelBundle:
    """Rebuild both networks from a bundle file, in eval mode, on `device`.

    Raises:
        CheckpointError: missing, unsafe, not a bundle, or weights that do not fit the bundle's config.
    """
    data = read_bundle_file(path)
    try:
        config = config_from_dict(data["config"], source=f"{path} (config)")
        schedule = NoiseSchedule.from_dict(data["schedule"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: bundle config is invalid: {exc}") from exc
    if schedule.num_timesteps != config.schedule.num_timesteps:
        raise CheckpointError(f"{path}: schedule length does not match the bundle's config")
    channels = config.data.image_channels
    unet = build_unet(config.unet, channels, conditional=config.method == "classifier_free")
    classifier = build_classifier(config.classifier, channels) if config.method == "classifier" else None
    networks: list[tuple[str, nn.Module]] = [("unet", unet)] + ([("classifier", classifier)] if classifier else [])
    for name, module in networks:
        try:
            module.load_state_dict(data[name])
        except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: {name} weights do not match the bundle's config") from exc
        module.to(device).eval().requires_grad_(False)
    return ModelBundle(
        config=config,
        schedule=schedule,
        unet=unet,
        classifier=classifier,
        package_version=str(data.get("package_version")),
        train_run_id=data.get("train_run_id"),
        extra=dict(data.get("extra") or {}),
    )
