"""Device, precision and batch-size choices, including the CUDA branches (mocked: tests run on CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from model_support import tiny_bundle

from anomaly_diffusion import runtime
from anomaly_diffusion.counterfactual import settings as explain
from anomaly_diffusion.counterfactual.scan import explain_slices
from anomaly_diffusion.counterfactual.settings import explain_settings
from anomaly_diffusion.errors import InputError
from anomaly_diffusion.runtime import Precision, choose_precision, cpu_bf16_feature, prepare_for_inference

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _cpu(amx: bool, avx512_bf16: bool) -> SimpleNamespace:
    """A stand-in for `torch.cpu` with the given capability probes."""
    return SimpleNamespace(_is_amx_tile_supported=lambda: amx, _is_avx512_bf16_supported=lambda: avx512_bf16)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "feature"),
    [(True, True, "amx"), (True, False, "amx"), (False, True, "avx512_bf16"), (False, False, None)],
)
def test_cpu_bf16_feature_for_each_capability(amx: bool, avx512_bf16: bool, feature: str | None) -> None:
    assert cpu_bf16_feature(_cpu(amx, avx512_bf16)) == feature


def test_a_torch_without_the_probes_means_no_native_bf16() -> None:
    assert cpu_bf16_feature(SimpleNamespace()) is None


@pytest.mark.parametrize(
    ("feature", "amp", "expected"),
    [
        ("amx", True, "bfloat16 (amx)"),
        ("avx512_bf16", True, "bfloat16 (avx512_bf16)"),
        (None, True, "float32 (no native bf16 on this CPU)"),
        ("avx512_bf16", False, "float32 (mixed precision off)"),
    ],
)
def test_cpu_precision_follows_the_native_feature(feature: str | None, amp: bool, expected: str) -> None:
    precision = choose_precision(CPU, amp, lambda: feature)
    assert str(precision) == expected
    assert isinstance(precision, Precision)


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bfloat16 (cuda)"), (False, "float16 (cuda without bf16)")])
def test_cuda_precision(monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert str(choose_precision(CUDA, True, lambda: None)) == expected
    assert str(choose_precision(CUDA, False)) == "float32 (mixed precision off)"


def test_autocast_is_off_exactly_when_the_choice_is_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "this_cpu_bf16", lambda: None)
    assert not isinstance(runtime.autocast(CPU, True), torch.autocast)
    monkeypatch.setattr(runtime, "this_cpu_bf16", lambda: "avx512_bf16")
    context = runtime.autocast(CPU, True)
    assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16
    assert not isinstance(runtime.autocast(CPU, False), torch.autocast)


def test_device_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == CPU
    with pytest.raises(InputError, match="no CUDA device is available"):
        runtime.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_device("auto") == CUDA
    assert runtime.resolve_device("cpu") == CPU


def test_threads_are_set_and_reported() -> None:
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert runtime.set_threads(None) == 1  # None keeps what is set
        assert "1 thread," in runtime.compute_summary(CPU, False)
    finally:
        torch.set_num_threads(before)


def test_batch_size_from_free_gpu_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tiny_bundle()
    assert explain.auto_batch_size(bundle) == explain.CPU_BATCH_SIZE
    monkeypatch.setattr(explain, "model_device", lambda b: CUDA)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(explain, "_guided_step_bytes", lambda b, d, probe: probe * 10e6)  # 10 MB a slice
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1e9, 8e9))  # 1 GB free
    assert explain.auto_batch_size(bundle, fraction=0.6) == 60
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1e6, 8e9))  # less than one slice
    assert explain.auto_batch_size(bundle) == 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1e12, 8e12))
    assert explain.auto_batch_size(bundle) == explain.MAX_AUTO_BATCH


def test_bf16_and_fp32_maps_of_a_tiny_model_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guided maps in bf16 autocast and in fp32 differ by at most 0.02 in normalised units (images span [-1, 3])
    and 5% of the map's peak; the bf16 path is forced so the test means the same on any CPU."""
    monkeypatch.setattr(runtime, "this_cpu_bf16", lambda: "avx512_bf16")
    bundle = tiny_bundle()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)).clamp(-1, 3)
    maps = {}
    for fp32 in (True, False):
        ready = prepare_for_inference(bundle, fp32=fp32)
        settings = explain_settings(ready, noise_level=20, steps=5, scale=3000.0)  # a strong push: a visible map
        assert settings.amp is not fp32
        maps[fp32] = explain_slices(ready, x, settings).anomaly_map
    difference, peak = (maps[True] - maps[False]).abs(), float(maps[True].max())
    assert peak > 0.1  # the maps are not trivially zero
    assert float(difference.max()) < min(0.02, 0.05 * peak)
    assert float(difference.mean()) < 0.005
