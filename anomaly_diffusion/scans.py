"""A scan to model-size slices and back: the typed results of an explanation on both grids."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from anomaly_diffusion.config import DataConfig
from anomaly_diffusion.data.io import Scan
from anomaly_diffusion.data.transforms import (
    PreprocessState,
    denormalise_delta,
    fit_preprocess,
    foreground_mask,
    input_slice_numbers,
    mask_to_slices,
    normalise,
    to_input_grid,
    to_plane_stack,
    to_slices,
)
from anomaly_diffusion.errors import InputError


@dataclass(frozen=True)
class SliceExplanation:
    """Explanation of a batch of model-size slices.

    Attributes:
        x: inputs, (N, C, S, S), normalised units.
        x_healthy: healthy counterfactuals, same shape.
        anomaly_map: the residual summed over channels (`residuals.residual_map`), (N, S, S).
        p_healthy_before: p(healthy | x, t=0), (N,).
        p_healthy_after: p(healthy | x_healthy, t=0), (N,).
        x_plain: the plain (unguided) reconstruction of the same x_L, where it was decoded, same shape as x.
    """

    x: torch.Tensor
    x_healthy: torch.Tensor
    anomaly_map: torch.Tensor
    p_healthy_before: torch.Tensor
    p_healthy_after: torch.Tensor
    x_plain: torch.Tensor | None = None


@dataclass(frozen=True)
class ScanExplanation:
    """Explanation of a whole scan, on the input's grid and at model resolution.

    Attributes:
        anomaly_map: (X, Y, Z) on the input grid, 0 outside the foreground and the explained slices.
        healthy: (C, X, Y, Z) healthy counterfactual in the input's intensity units.
        slices: the model-resolution explanation of the kept slices (its map also masked).
        state: how the scan was preprocessed (kept slice indices, crop, intensities).
        foreground: (X, Y, Z) bool, the brain/foreground mask the scores are restricted to.
        slice_foreground: (N, S, S) bool, the same at model resolution.
    """

    anomaly_map: np.ndarray
    healthy: np.ndarray
    slices: SliceExplanation
    state: PreprocessState
    foreground: np.ndarray
    slice_foreground: torch.Tensor


@dataclass(frozen=True)
class PreparedScan:
    """A scan preprocessed as in training, ready for the model.

    Attributes:
        state: how it was preprocessed (kept slice indices, crop, intensities).
        x: the kept slices, (N, C, S, S) in normalised units.
        foreground: (X, Y, Z) bool, the brain/foreground mask the scores are restricted to.
        slice_foreground: (N, S, S) bool, the same at model resolution.
    """

    state: PreprocessState
    x: torch.Tensor
    foreground: np.ndarray
    slice_foreground: torch.Tensor


def prepare_scan(cfg: DataConfig, scan: Scan, brainmask: np.ndarray | None = None) -> PreparedScan:
    """Preprocess a scan with a model's data config; the foreground is the brain mask if given."""
    if scan.data.shape[0] != cfg.image_channels:
        raise InputError(
            f"{scan.sources[0]}: the model expects {cfg.image_channels} channel(s), the scan has {scan.data.shape[0]}"
        )
    state = fit_preprocess(scan.data, scan.affine, cfg, brainmask=brainmask, source=str(scan.sources[0]))
    foreground = brainmask.astype(bool) if brainmask is not None else foreground_mask(scan.data)
    return PreparedScan(state, to_slices(scan.data, state, cfg), foreground, mask_to_slices(foreground, state))


def assemble_scan(scan: Scan, prepared: PreparedScan, result: SliceExplanation) -> ScanExplanation:
    """Restrict a slice explanation's map to the foreground and map it back onto the scan's grid."""
    state = prepared.state
    result = replace(result, anomaly_map=result.anomaly_map * prepared.slice_foreground)
    anomaly_map = to_input_grid(result.anomaly_map[:, None], state, fill=0.0)[0]
    delta = denormalise_delta(to_input_grid(result.x_healthy - result.x, state, fill=0.0), state)
    return ScanExplanation(
        anomaly_map=np.where(prepared.foreground, np.maximum(anomaly_map, 0.0), 0.0).astype(np.float32),
        healthy=(scan.data + delta).astype(np.float32),
        slices=result,
        state=state,
        foreground=prepared.foreground,
        slice_foreground=prepared.slice_foreground,
    )


@dataclass(frozen=True)
class InputPlanes:
    """An explained scan as slices at the input's own resolution, for people to look at.

    Each array is (A, B, N): the canonical in-plane axes of `to_plane_stack` cropped to the square
    the model saw (clipped to the image), slices last and numbered as `state.kept`. Nothing is
    resampled: one pixel is one input voxel.

    Attributes:
        image, healthy: channel 0 of the scan and of its healthy counterfactual, in normalised
            units (the foreground's intensity percentiles at -1 and 1, clipped as for the model).
        anomaly_map: the anomaly map.
        truth: the lesion mask (bool), or None.
        kept: canonical indices of the slices the model explained, (N_kept,).
        numbers: the input file's voxel index along its sliced axis of each canonical slice, (N,).
    """

    image: np.ndarray
    healthy: np.ndarray
    anomaly_map: np.ndarray
    truth: np.ndarray | None
    kept: np.ndarray
    numbers: np.ndarray


def input_planes(
    scan: Scan, explanation: ScanExplanation, cfg: DataConfig, truth: np.ndarray | None = None
) -> InputPlanes:
    """The scan, its counterfactual, its map and the lesion mask (X, Y, Z) as `InputPlanes`."""
    state = explanation.state
    first = replace(state, low=state.low[:1], high=state.high[:1])
    a0, b0, side = state.box
    a_len, b_len = state.plane_shape
    window = (slice(max(a0, 0), min(a0 + side, a_len)), slice(max(b0, 0), min(b0 + side, b_len)))

    def planes(volume: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(to_plane_stack(volume, state)[window])

    return InputPlanes(
        image=planes(normalise(scan.data[:1], first, cfg)[0]),
        healthy=planes(normalise(explanation.healthy[:1], first, cfg)[0]),
        anomaly_map=planes(explanation.anomaly_map),
        truth=planes(truth.astype(bool)) if truth is not None else None,
        kept=state.kept,
        numbers=input_slice_numbers(state),
    )
