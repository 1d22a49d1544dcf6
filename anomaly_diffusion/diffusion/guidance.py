"""Classifier guidance (Dhariwal & Nichol 2021, Alg. 2) as a wrapper around the denoiser.

    eps_hat(x_t, t) = eps_theta(x_t, t) - s * sqrt(1 - alpha_bar_t) * grad_x log p(y | x_t, t)

Wolleb et al. 2022 guide the decoding towards y = HEALTHY with the noise-aware classifier. With a
multiple-instance classifier the target may also be every region healthy (`region_grad_fn`).

Guidance targets are registered in `GUIDANCE` (name -> `GuidanceTarget`): config validation, the
CLI's `--guidance` choices and evaluate's `g=` key come from it. A new target is one grad-function
factory here plus one `GUIDANCE.register` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from anomaly_diffusion.diffusion.sampling import EpsFn
from anomaly_diffusion.diffusion.schedule import NoiseSchedule, broadcast_to
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.labels import HEALTHY
from anomaly_diffusion.registry import Registry

GradFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""grad_x log p(y | x_t, t): x_t (B, C, *spatial), t (B,) -> gradient, same shape as x_t."""


def guided_eps(eps: torch.Tensor, grad: torch.Tensor, alpha_bar_t: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_hat = eps - s * sqrt(1 - alpha_bar_t) * grad (Dhariwal & Nichol 2021, Alg. 2).

    Args:
        eps: eps_theta(x_t, t), (B, C, *spatial).
        grad: grad_x log p(y | x_t, t), same shape.
        alpha_bar_t: (B,) or 0-dim.
        scale: s, the guidance scale.
    """
    alpha_bar_t = broadcast_to(alpha_bar_t.reshape(-1).expand(eps.shape[0]), eps)
    return eps - scale * (1 - alpha_bar_t).sqrt() * grad


def guided_eps_fn(eps_fn: EpsFn, grad_fn: GradFn, schedule: NoiseSchedule, scale: float) -> EpsFn:
    """Wrap a denoiser so it returns the classifier-guided eps_hat (a no-op wrapper when s = 0)."""
    if scale == 0:
        return eps_fn
    alpha_bar = schedule.alpha_bar

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_eps(eps_fn(x_t, t), grad_fn(x_t, t), alpha_bar.to(t.device)[t], scale)

    return fn


def classifier_grad_fn(classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], target: int) -> GradFn:
    """grad_x log p(y = target | x_t, t) of a noise-aware classifier returning logits (B, n_classes).

    Only the input gradient is computed: the classifier's parameters are not asked for gradients.
    Each sample's gradient is its own as long as the classifier mixes no samples (GroupNorm, no
    BatchNorm), so summing the log-probabilities over the batch is exact.
    """

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            log_p = torch.log_softmax(classifier(x, t).float(), dim=1)[:, target]
            (grad,) = torch.autograd.grad(log_p.sum(), x)
        return grad.detach()

    return fn


def region_grad_fn(region_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> GradFn:
    """grad_x sum_p log p(region p healthy | x_t, t) = grad_x sum_p -softplus(a_p), a_p the region logits (B, P).

    The "every region healthy" target of a multiple-instance classifier: where the slice target
    log p(healthy | x_t) = -softplus(LSE_p a_p - log P) stops pushing once the most abnormal region
    looks healthy, this one pushes every region in proportion to sigmoid(a_p), so the rim of a
    large lesion keeps being pushed after its core is gone. The labels stay slice-level.
    """

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            log_p = -torch.nn.functional.softplus(region_logits(x, t).float())
            (grad,) = torch.autograd.grad(log_p.sum(), x)
        return grad.detach()

    return fn


class GuidanceSource(Protocol):
    """The classifier outputs a guidance target may differentiate, each (x_t, t) -> fp32 logits."""

    def logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Slice logits, (B, n_classes)."""
        ...

    def region_logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-region abnormality logits a_p of a multiple-instance classifier, (B, P)."""
        ...


@dataclass(frozen=True)
class GuidanceTarget:
    """A guidance target: how to make grad_x log p(target | x_t, t) from the classifier.

    Attributes:
        grad_fn: GuidanceSource -> GradFn.
        poolings: the classifier poolings (`classifier.pooling`) it works with; () means any.
    """

    grad_fn: Callable[[GuidanceSource], GradFn]
    poolings: tuple[str, ...] = ()


GUIDANCE: Registry[GuidanceTarget] = Registry("guidance")
GUIDANCE.register(
    "slice",
    GuidanceTarget(lambda source: classifier_grad_fn(source.logits, HEALTHY)),
    "grad log p(healthy | x_t), the paper",
)
GUIDANCE.register(
    "regions",
    GuidanceTarget(lambda source: region_grad_fn(source.region_logits), poolings=("lse",)),
    "every region of an lse classifier towards healthy",
)


def guidance_conflict(name: str, pooling: str) -> str | None:
    """Why target `name` cannot guide a classifier that pools by `pooling` (None: it can, or unknown name)."""
    if name not in GUIDANCE:
        return None
    poolings = GUIDANCE.get(name).function.poolings
    if poolings and pooling not in poolings:
        needed = " or ".join(poolings)
        return f"guidance={name} needs a classifier with pooling={needed}; this model's pools by {pooling}"
    return None


def check_guidance(name: str, pooling: str) -> str:
    """The target's name if it is registered and fits the classifier's pooling, else ConfigError."""
    GUIDANCE.check(name)
    conflict = guidance_conflict(name, pooling)
    if conflict:
        raise ConfigError(conflict)
    return name
