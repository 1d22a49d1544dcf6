"""Explain a scan or a stack of slices, with one setting or an ensemble (mean map and its spread)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from anomaly_diffusion.counterfactual.cache import SliceDecodings
from anomaly_diffusion.counterfactual.settings import ExplainSettings
from anomaly_diffusion.counterfactual.slices import SliceProgress
from anomaly_diffusion.data.io import Scan
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.scans import ScanExplanation, SliceExplanation, assemble_scan, prepare_scan


def explain_slices(
    bundle: ModelBundle, x: torch.Tensor, settings: ExplainSettings, progress: SliceProgress | None = None
) -> SliceExplanation:
    """Explain model-size slices x (N, C, S, S): encode, guided decode, map, p(healthy) before/after."""
    return SliceDecodings(bundle, x).explanation(settings, progress)


@dataclass(frozen=True)
class EnsembleExplanation:
    """The explanation of an ensemble of settings (levels, draws) of the same slices.

    Attributes:
        mean: its map is the mean of the members' maps; x_healthy and p(healthy) after are the
            first member's (as `adiff evaluate` does for an ensemble method).
        spread: (N, S, S), the per-pixel standard deviation of the members' maps (ddof = 0: zero
            where they agree, and for a single member).
        members: how many maps were averaged.
    """

    mean: SliceExplanation
    spread: torch.Tensor
    members: int


def explain_ensemble(
    bundle: ModelBundle,
    x: torch.Tensor,
    plans: Sequence[ExplainSettings],
    progress: SliceProgress | None = None,
) -> EnsembleExplanation:
    """Explain slices x (N, C, S, S) with every member of an ensemble; mean map and its spread.

    Members with equal `encode_key` share one encoding and with equal `decode_key` one decoding.
    `progress` counts slices over all distinct decodings.
    """
    if not plans:
        raise ValueError("an ensemble needs at least one member")
    decodings = len({p.decode_key for p in plans})
    cache = SliceDecodings(bundle, x)
    maps = []
    done_keys: set[object] = set()
    for plan in plans:
        offset = len(done_keys) * x.shape[0]
        done_keys.add(plan.decode_key)

        def step(done: int, total: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + done, total * decodings)

        maps.append(cache.explanation(plan, None if cache.is_decoded(plan) else step).anomaly_map)
    stacked = torch.stack(maps)
    mean = replace(cache.explanation(plans[0]), anomaly_map=stacked.mean(dim=0))
    return EnsembleExplanation(mean, stacked.std(dim=0, correction=0), len(plans))


@dataclass(frozen=True)
class ScanEnsemble:
    """An ensemble's explanation of a scan: the mean map's `ScanExplanation` and the spread on the input's grid.

    Attributes:
        explanation: as `explain_scan`'s, with the ensemble's mean map.
        uncertainty: (X, Y, Z), the members' per-voxel standard deviation on the input grid (0 outside
            the foreground and the explained slices).
        members: how many maps were averaged.
    """

    explanation: ScanExplanation
    uncertainty: np.ndarray
    members: int


def explain_scan_ensemble(
    bundle: ModelBundle,
    scan: Scan,
    plans: Sequence[ExplainSettings],
    brainmask: np.ndarray | None = None,
    progress: SliceProgress | None = None,
) -> ScanEnsemble:
    """`explain_scan` with an ensemble (`explain_ensemble`): the mean map and its spread, both on the scan's grid."""
    prepared = prepare_scan(bundle.config.data, scan, brainmask)
    ensemble = explain_ensemble(bundle, prepared.x, plans, progress)
    explanation = assemble_scan(scan, prepared, ensemble.mean)
    spread = assemble_scan(scan, prepared, replace(ensemble.mean, anomaly_map=ensemble.spread)).anomaly_map
    return ScanEnsemble(explanation, spread, ensemble.members)


def explain_scan(
    bundle: ModelBundle,
    scan: Scan,
    settings: ExplainSettings,
    brainmask: np.ndarray | None = None,
    progress: SliceProgress | None = None,
) -> ScanExplanation:
    """Preprocess a scan as in training, explain its foreground slices, map results to its grid.

    The anomaly map is restricted to the foreground (the brain mask when given, else the
    intensity threshold used by preprocessing): differences in the background mean nothing.
    """
    prepared = prepare_scan(bundle.config.data, scan, brainmask)
    return assemble_scan(scan, prepared, explain_slices(bundle, prepared.x, settings, progress))
