"""Where and in what precision the networks run: device choice, autocast, inference preparation.

Training and inference both import this module; neither imports the other for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import nn

from anomaly_diffusion.errors import InputError
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.models.networks import NoiseAwareClassifier


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but no CUDA device is available")
    return torch.device(name)


CPU_BF16_PROBES = (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
"""CPU features that do bf16 matrix work in hardware, by the `torch.cpu` probe that reports each."""


def cpu_bf16_feature(cpu: Any = torch.cpu) -> str | None:
    """The first of `CPU_BF16_PROBES` this CPU has ('amx', 'avx512_bf16'), or None.

    With either, oneDNN runs bf16 convolutions natively: measured 1.7x faster than fp32 for the
    brats64 UNet (training and explain) on an AMD EPYC with AVX512-BF16 and 2-3x on a Xeon with AMX. Without, bf16
    is emulated and 1.3-3.5x slower than fp32. `cpu` is `torch.cpu` (a stand-in in tests).
    """
    for feature, probe in CPU_BF16_PROBES:
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return feature
    return None


@functools.cache
def this_cpu_bf16() -> str | None:
    """`cpu_bf16_feature` of this CPU, asked once per process (`autocast` runs on every network call)."""
    return cpu_bf16_feature()


@dataclass(frozen=True)
class Precision:
    """What the networks compute in on a device, and why: str() gives e.g. 'bfloat16 (avx512_bf16)'."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        """'bfloat16', 'float16' or 'float32'."""
        return str(self.dtype).removeprefix("torch.")

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def choose_precision(device: torch.device, amp: bool, cpu_feature: Callable[[], str | None] | None = None) -> Precision:
    """Mixed precision where the hardware does it natively, fp32 elsewhere or when `amp` is off.

    CUDA: bf16 (fp16 on GPUs without bf16). CPU: bf16 with AMX or AVX512-BF16 (`cpu_feature`, by
    default this CPU's `cpu_bf16_feature`), else fp32. `amp` False (`--fp32`, `train.amp: false`): fp32.
    """
    if not amp:
        return Precision(torch.float32, "mixed precision off")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "cuda")
        return Precision(torch.float16, "cuda without bf16")
    feature = (cpu_feature or this_cpu_bf16)() if device.type == "cpu" else None
    if feature is not None:
        return Precision(torch.bfloat16, feature)
    return Precision(torch.float32, "no native bf16 on this CPU")


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager[object]:
    """`torch.autocast` in the precision `choose_precision` picks; nothing when that is fp32."""
    precision = choose_precision(device, enabled)
    if precision.dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=precision.dtype)


def precision_name(device: torch.device, amp: bool) -> str:
    """What `autocast(device, amp)` computes in, and why, e.g. 'bfloat16 (avx512_bf16)'."""
    return str(choose_precision(device, amp))


def compute_summary(device: torch.device, amp: bool) -> str:
    """'cpu, 2 threads, bfloat16 (avx512_bf16)': what a run computes on, printed at its start."""
    threads = torch.get_num_threads()
    return f"{device.type}, {threads} thread{'s' if threads != 1 else ''}, {choose_precision(device, amp)}"


def set_threads(threads: int | None) -> int:
    """Use `threads` CPU threads for torch (None: keep torch's choice, which follows OMP_NUM_THREADS).

    Two torch processes on 2 cores with default threads each slowed a training step several-fold
    (oversubscription): give each `--threads 1` or OMP_NUM_THREADS=1. Returns the threads in use.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def model_device(bundle: ModelBundle) -> torch.device:
    """The device the bundle's networks are on."""
    return next(bundle.unet.parameters()).device


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to the model's device, channels-last (NHWC): cuDNN and oneDNN run 2D convolutions
    fastest so (measured on CPU: 1.6x for the brats64 UNet in fp32, 1.2x in bf16)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def prepare_for_inference(bundle: ModelBundle, compile_networks: bool = False, fp32: bool = False) -> ModelBundle:
    """The bundle made ready to explain: channels-last weights, optionally `torch.compile`d networks.

    Compiling costs minutes up front (and again for a new batch size): worth it for many volumes.
    `fp32` turns mixed precision off (the returned bundle's `config.train.amp` is False), for
    results that do not depend on the hardware's bf16 support.
    """
    if fp32:
        config = bundle.config
        bundle = replace(
            bundle, config=config.model_copy(update={"train": config.train.model_copy(update={"amp": False})})
        )
    unet, classifier = bundle.unet, bundle.classifier
    unet = unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if classifier is not None and next(classifier.parameters()).device.type == "cuda":
        # not on CPU: there GroupNorm's backward (the guidance gradient) is 2.7x slower in NHWC
        classifier = classifier.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if compile_networks:
        unet = cast(nn.Module, torch.compile(unet))
        if classifier is not None:
            classifier = cast(NoiseAwareClassifier, torch.compile(classifier))
    return replace(bundle, unet=unet, classifier=classifier)
