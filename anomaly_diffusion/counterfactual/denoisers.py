"""The bundle's networks as denoisers: eps_theta under mixed precision, a classifier-free model's
eps(x_t, t, y), the denoiser of the DDIM inversion, and eps_hat guided towards healthy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from anomaly_diffusion.diffusion.guidance import GUIDANCE
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.labels import NULL_LABEL, PATHOLOGICAL
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.runtime import autocast, model_device


def _in_mixed_precision(
    bundle: ModelBundle, network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], amp: bool
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    device = model_device(bundle)

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return network(x_t, t).float()

    return fn


def denoiser(bundle: ModelBundle, amp: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps_theta(x_t, t) (B, C, S, S) in fp32, computed under autocast when `amp` (see `runtime.autocast`).

    A classifier-free model's unconditional denoiser: eps(x_t, t, null).
    """
    return _in_mixed_precision(bundle, bundle.unet, amp)


def conditional_denoiser(
    bundle: ModelBundle, amp: bool
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps(x_t, t, y) of a classifier-free model (labels y (B,)), in fp32 under autocast when `amp`."""
    if bundle.config.method != "classifier_free":
        raise ConfigError("this model has no label-conditional denoiser (method=classifier, not classifier_free)")
    device = model_device(bundle)

    def fn(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            eps: torch.Tensor = bundle.unet(x_t, t, y)
            return eps.float()

    return fn


def encoding_denoiser(
    bundle: ModelBundle, amp: bool, encode_label: str = "null"
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The denoiser of the DDIM inversion: eps_theta, or a classifier-free model's eps(x_t, t, encode_label)."""
    if bundle.config.method != "classifier_free" or encode_label == "null":
        return denoiser(bundle, amp)
    conditional = conditional_denoiser(bundle, amp)
    label = PATHOLOGICAL if encode_label == "pathological" else NULL_LABEL

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return conditional(x_t, t, torch.full((x_t.shape[0],), label, dtype=torch.long, device=x_t.device))

    return fn


class BundleSource:
    """The bundle's networks as a `guidance.GuidanceSource`, each under the denoiser's autocast."""

    def __init__(self, bundle: ModelBundle, amp: bool) -> None:
        self.bundle, self.amp = bundle, amp
        self.eps = denoiser(bundle, amp)

    def _classifier(self) -> Any:
        if self.bundle.classifier is None:
            raise ConfigError("this model is classifier-free: it has no classifier to guide with")
        return self.bundle.classifier

    def logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _in_mixed_precision(self.bundle, self._classifier(), self.amp)(x_t, t)

    def region_logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _in_mixed_precision(self.bundle, self._classifier().region_logits, self.amp)(x_t, t)

    def conditional_eps(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return conditional_denoiser(self.bundle, self.amp)(x_t, t, y)


def guided_denoiser(
    bundle: ModelBundle, scale: float, amp: bool, guidance: str, smooth: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps_hat(x_t, t): the denoiser guided towards HEALTHY with scale s (plain eps_theta when s = 0).

    `guidance` names a `GUIDANCE` target: 'slice' follows grad log p(healthy | x_t); 'regions'
    follows grad sum_p log p(region p healthy | x_t) of the multiple-instance classifier; 'cfg'
    is classifier-free guidance with weight w = scale (w = 0: eps(null), the same as s = 0).
    `smooth` low-passes a classifier gradient with a Gaussian of that std in pixels.
    """
    if scale == 0:
        return denoiser(bundle, amp)
    return GUIDANCE.get(guidance).function.build(BundleSource(bundle, amp), bundle.schedule, scale, smooth)
