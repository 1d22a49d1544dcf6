"""Guidance towards healthy as wrappers around the denoiser: two ways.

Classifier guidance (Dhariwal & Nichol 2021, Alg. 2), with a noise-aware classifier:

    eps_hat(x_t, t) = eps_theta(x_t, t) - s * sqrt(1 - alpha_bar_t) * grad_x log p(y | x_t, t)

Wolleb et al. 2022 guide the decoding towards y = HEALTHY. With a multiple-instance classifier the
target may also be every region healthy (`region_grad_fn`).

Classifier-free guidance (Ho & Salimans 2022), with one label-conditional denoiser trained with
label dropout, no classifier and no gradient:

    eps_hat(x_t, t) = eps(x_t, t, null) + w * (eps(x_t, t, y) - eps(x_t, t, null))

(w = 0: the unconditional path; w = 1: plain conditional; w > 1: further towards y = HEALTHY.)
Sanchez et al. 2022 use it for lesion localisation.

Guidance targets are registered in `GUIDANCE` (name -> `GuidanceTarget`): config validation, the
CLI's `--guidance` choices and evaluate's `g=` key come from it. A new classifier target is one
grad-function factory here plus one `GUIDANCE.register(name, classifier_target(factory), help)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from anomaly_diffusion.diffusion.masking import gaussian_blur
from anomaly_diffusion.diffusion.sampling import EpsFn
from anomaly_diffusion.diffusion.schedule import NoiseSchedule, broadcast_to
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.labels import HEALTHY, NULL_LABEL
from anomaly_diffusion.registry import Registry

GuidanceMethod = Literal["classifier", "classifier_free"]
"""How a model guides: with its noise-aware classifier, or classifier-free (a label-conditional denoiser)."""

ConditionalEpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""eps(x_t, t, y): x_t (B, C, *spatial), t (B,), class labels y (B,) -> (B, C, *spatial)."""

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


def smoothed_grad_fn(grad_fn: GradFn, sigma: float) -> GradFn:
    """grad_fn low-passed on the image grid: G_sigma * grad_x log p(y | x_t, t), same shape as x_t.

    A region classifier's input gradient carries power at its grid's period (a lattice in the
    counterfactual); a Gaussian of std sigma pixels keeps the lesion-sized part of the push and
    removes the lattice (see `masking`). sigma = 0 returns grad_fn itself.
    """
    if sigma <= 0:
        return grad_fn

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(grad_fn(x_t, t), sigma)

    return fn


def cfg_eps(eps_cond: torch.Tensor, eps_null: torch.Tensor, w: float) -> torch.Tensor:
    """eps_hat = eps_null + w * (eps_cond - eps_null) (Ho & Salimans 2022, eq. 6 with w = 1 + their w).

    Args:
        eps_cond: eps(x_t, t, y), (B, C, *spatial).
        eps_null: eps(x_t, t, null), same shape.
        w: the guidance weight (0: unconditional, 1: conditional, > 1: stronger towards y).
    """
    return eps_null + w * (eps_cond - eps_null)


def cfg_eps_fn(conditional_eps: ConditionalEpsFn, w: float, target: int = HEALTHY, null: int = NULL_LABEL) -> EpsFn:
    """Wrap a label-conditional denoiser so it returns the classifier-free-guided eps_hat towards `target`.

    The conditional and the null pass run as one forward on the batch stacked twice (2B slices):
    one network call per step instead of two. w = 0 and w = 1 need only one of the passes and run
    only that one.
    """

    def labels(n: int, value: int, device: torch.device) -> torch.Tensor:
        return torch.full((n,), value, dtype=torch.long, device=device)

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x_t.shape[0]
        if w == 0:
            return conditional_eps(x_t, t, labels(n, null, x_t.device))
        if w == 1:
            return conditional_eps(x_t, t, labels(n, target, x_t.device))
        y = torch.cat([labels(n, target, x_t.device), labels(n, null, x_t.device)])
        eps = conditional_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), y)
        return cfg_eps(eps[:n], eps[n:], w)

    return fn


class GuidanceSource(Protocol):
    """What a guidance target may use: the denoiser and, by the model's method, the classifier's outputs.

    The classifier methods raise for a classifier-free model, `conditional_eps` for a classifier model;
    `check_guidance` keeps a target away from a model that cannot give what it needs.
    """

    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t) (unconditional; the null label of a classifier-free model), (B, C, *spatial)."""
        ...

    def conditional_eps(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps(x_t, t, y) of a label-conditional (classifier-free) denoiser, (B, C, *spatial)."""
        ...

    def logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Slice logits, (B, n_classes)."""
        ...

    def region_logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-region abnormality logits a_p of a multiple-instance classifier, (B, P)."""
        ...


@dataclass(frozen=True)
class GuidanceTarget:
    """A guidance target: how to make the guided denoiser eps_hat from a model, at scale s (or weight w).

    Attributes:
        build: (GuidanceSource, schedule, scale, smooth) -> eps_hat(x_t, t); `smooth` is the std in
            pixels of the Gaussian that low-passes a classifier gradient (`smoothed_grad_fn`; 0: none).
        method: the kind of model it guides (`GuidanceMethod`).
        poolings: the classifier poolings (`classifier.pooling`) it works with; () means any.
        needs_gradients: whether eps_hat differentiates through a network (else decoding runs
            under `torch.inference_mode`).
    """

    build: Callable[[GuidanceSource, NoiseSchedule, float, float], EpsFn]
    method: GuidanceMethod = "classifier"
    poolings: tuple[str, ...] = ()
    needs_gradients: bool = True


def classifier_target(grad_fn: Callable[[GuidanceSource], GradFn], poolings: tuple[str, ...] = ()) -> GuidanceTarget:
    """A classifier-guidance target from a factory of grad_x log p(target | x_t, t) (`guided_eps_fn`)."""
    return GuidanceTarget(
        lambda source, schedule, scale, smooth: guided_eps_fn(
            source.eps, smoothed_grad_fn(grad_fn(source), smooth), schedule, scale
        ),
        poolings=poolings,
    )


GUIDANCE: Registry[GuidanceTarget] = Registry("guidance")
GUIDANCE.register(
    "slice",
    classifier_target(lambda source: classifier_grad_fn(source.logits, HEALTHY)),
    "grad log p(healthy | x_t), the paper",
)
GUIDANCE.register(
    "regions",
    classifier_target(lambda source: region_grad_fn(source.region_logits), poolings=("lse",)),
    "every region of an lse classifier towards healthy",
)
GUIDANCE.register(
    "cfg",
    GuidanceTarget(
        lambda source, schedule, w, smooth: cfg_eps_fn(source.conditional_eps, w),
        method="classifier_free",
        needs_gradients=False,
    ),
    "classifier-free: eps(null) + w (eps(healthy) - eps(null)), --scale is w",
)


def guidance_conflict(name: str, pooling: str, method: GuidanceMethod = "classifier") -> str | None:
    """Why target `name` cannot guide this model (None: it can, or unknown name).

    Args:
        pooling: the model's `classifier.pooling` (unused for a classifier-free model).
        method: the model's `method`.
    """
    if name not in GUIDANCE:
        return None
    target = GUIDANCE.get(name).function
    if target.method != method:
        if method == "classifier_free":
            cfg_names = "/".join(n for n in GUIDANCE.names() if GUIDANCE.get(n).function.method == method)
            return f"guidance={name} needs a classifier; this model is classifier-free (guidance: {cfg_names})"
        return f"guidance={name} needs a classifier-free model (method=classifier_free); this model has a classifier"
    if method == "classifier" and target.poolings and pooling not in target.poolings:
        needed = " or ".join(target.poolings)
        return f"guidance={name} needs a classifier with pooling={needed}; this model's pools by {pooling}"
    return None


def check_guidance(name: str, pooling: str, method: GuidanceMethod = "classifier") -> str:
    """The target's name if it is registered and can guide this model, else ConfigError."""
    GUIDANCE.check(name)
    conflict = guidance_conflict(name, pooling, method)
    if conflict:
        raise ConfigError(conflict)
    return name
