"""One cache of encodings, decodings and explanations of a stack of slices, shared by explain, its
ensembles and evaluate: settings that agree on the encoding or decoding pay for it once."""

from __future__ import annotations

from dataclasses import replace

import torch

from anomaly_diffusion.counterfactual.settings import ExplainSettings
from anomaly_diffusion.counterfactual.slices import (
    SliceProgress,
    counterfactuals,
    encode_slices,
    p_healthy_batched,
    slice_explanation,
    with_residual,
)
from anomaly_diffusion.diffusion.decoding import Decoded
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.scans import SliceExplanation


class SliceDecodings:
    """The encodings, decodings and explanations of one stack of slices x (N, C, S, S), shared by settings.

    Settings with equal `encode_key` share one encoding, with equal `decode_key` one decoding; the
    residual, pairing and channel only change the map. The plain reconstruction that
    `pairing: reconstruction` compares with is the unguided DDIM decoding (`plain_key`): taken from
    the cache (an s = 0 candidate, or a masked decoding that walked it beside the guided one), else
    decoded once. Explain, its ensembles and evaluate all go through this one cache.
    With `gate` > 0 only the slices the classifier calls pathological are decoded (`kept`).
    """

    def __init__(self, bundle: ModelBundle, x: torch.Tensor) -> None:
        self.bundle, self.x = bundle, x
        self._p_healthy: torch.Tensor | None = None
        self._encoded: dict[object, torch.Tensor] = {}
        self._decoded: dict[object, Decoded] = {}
        self._plain: dict[object, torch.Tensor] = {}
        self._explained: dict[object, SliceExplanation] = {}

    def encoded(self, settings: ExplainSettings) -> torch.Tensor:
        """x_L of the settings' encoding."""
        if settings.encode_key not in self._encoded:
            self._encoded[settings.encode_key] = encode_slices(self.bundle, self.x, settings)
        return self._encoded[settings.encode_key]

    def kept(self, settings: ExplainSettings) -> torch.Tensor:
        """(N,) bool: the slices the settings decode, p(pathological | x, t=0) >= gate (all without a gate)."""
        if settings.gate <= 0:
            return torch.ones(self.x.shape[0], dtype=torch.bool)
        if self._p_healthy is None:
            self._p_healthy = p_healthy_batched(self.bundle, self.x, settings.batch_size)
        return (1 - self._p_healthy) >= settings.gate

    def decoded(self, settings: ExplainSettings, progress: SliceProgress | None = None) -> Decoded:
        """The settings' counterfactuals (and the plain reconstruction where the decoding walked it).

        Slices a gate leaves out keep the input as counterfactual and as plain reconstruction.
        """
        key = settings.decode_key
        if key not in self._decoded:
            x_L, keep = self.encoded(settings), self.kept(settings)
            if bool(keep.all()):
                decoded = counterfactuals(self.bundle, x_L, settings, progress, x_0=self.x)
            else:
                part = counterfactuals(self.bundle, x_L[keep], settings, progress, x_0=self.x[keep])
                healthy = self.x.clone()
                healthy[keep] = part.healthy
                plain = None
                if part.plain is not None:
                    plain = self.x.clone()
                    plain[keep] = part.plain
                decoded = Decoded(healthy, plain)
            self._decoded[key] = decoded
            if decoded.plain is not None:
                self._plain.setdefault(settings.plain_key, decoded.plain)
            if key == settings.plain_key:
                self._plain.setdefault(key, decoded.healthy)
        return self._decoded[key]

    def is_decoded(self, settings: ExplainSettings) -> bool:
        """Whether the settings' decoding is already in the cache."""
        return settings.decode_key in self._decoded

    def reconstruction(self, settings: ExplainSettings) -> torch.Tensor:
        """The plain DDIM reconstruction of the settings' x_L, (N, C, S, S)."""
        if settings.plain_key not in self._plain:
            self.decoded(replace(settings, scale=0.0, decoding="ddim"))
        return self._plain[settings.plain_key]

    def explanation(self, settings: ExplainSettings, progress: SliceProgress | None = None) -> SliceExplanation:
        """The settings' explanation: counterfactual, map (residual, pairing, channel), p(healthy) before/after."""
        key = settings.decode_key
        decoded = self.decoded(settings, progress)
        if key not in self._explained:
            self._explained[key] = slice_explanation(
                self.bundle, self.x, decoded.healthy, replace(settings, pairing="input"), decoded.plain
            )
        explanation = self._explained[key]
        if settings.pairing == "reconstruction" and explanation.x_plain is None:
            explanation = self._explained[key] = replace(explanation, x_plain=self.reconstruction(settings))
        explained = with_residual(explanation, settings)
        keep = self.kept(settings)
        if not bool(keep.all()):
            explained.anomaly_map[~keep] = 0.0  # a slice the gate calls healthy has no anomaly
        return explained
