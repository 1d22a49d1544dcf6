"""A tiny untrained model bundle for unit tests (the tiny config's networks, output layer randomised)."""

from __future__ import annotations

from pathlib import Path

import torch

from anomaly_diffusion.config import load_config
from anomaly_diffusion.diffusion.schedule import make_schedule
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.models.networks import build_classifier, build_unet

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def tiny_bundle(seed: int = 0) -> ModelBundle:
    """The tiny config's UNet (T = 100, 16x16) and classifier, in eval mode, on the CPU."""
    cfg = load_config(TINY)
    torch.manual_seed(seed)
    unet = build_unet(cfg.unet, 1)
    torch.nn.init.normal_(unet.out[-1].conv.weight, std=0.1)  # MONAI zero-initialises the output conv
    classifier = build_classifier(cfg.classifier, 1)
    for module in (unet, classifier):
        module.eval().requires_grad_(False)
    schedule = make_schedule(cfg.schedule.kind, cfg.schedule.num_timesteps)
    return ModelBundle(cfg, schedule, unet, classifier, "test", None, {})


def tiny_cfg_bundle(seed: int = 0, overrides: list[str] | None = None) -> ModelBundle:
    """The tiny config as a classifier-free model: a label-conditional UNet, no classifier; class embeddings
    and the output conv randomised so that the labels change eps."""
    cfg = load_config(TINY, ["method=classifier_free", *(overrides or [])])
    torch.manual_seed(seed)
    unet = build_unet(cfg.unet, 1, conditional=True)
    for weight in unet.parameters():  # MONAI zero-initialises the output conv and each res block's last conv
        if weight.dim() > 1 and not weight.any():
            torch.nn.init.normal_(weight, std=0.1)
    torch.nn.init.normal_(unet.unet.class_embedding.weight, std=1.0)
    unet.eval().requires_grad_(False)
    schedule = make_schedule(cfg.schedule.kind, cfg.schedule.num_timesteps)
    return ModelBundle(cfg, schedule, unet, None, "test", None, {})
