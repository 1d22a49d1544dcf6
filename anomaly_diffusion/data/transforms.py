"""Preprocessing shared by training and explain, and its inverse back to the input's grid.

Recipe (parameters in `DataConfig`, stored in the model bundle):
1. reorient to the closest canonical RAS orientation and put the slice axis last;
2. foreground = the brain mask when given, else voxels clearly above background;
3. per channel, map the foreground's intensity percentiles (low, high) to (-1, 1), clip;
4. crop one square in-plane box around the foreground (same box for every slice), pad with -1;
5. resize each slice to image_size x image_size (bilinear, antialiased);
6. keep slices whose crop holds at least min_foreground_fraction of foreground.
`PreprocessState` records what was done so `to_input_grid` can undo 6-1 for maps and images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

from anomaly_diffusion.config import DataConfig
from anomaly_diffusion.errors import InputError

_SLICE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
BACKGROUND = -1.0


@dataclass(frozen=True)
class PreprocessState:
    """How one volume was preprocessed.

    Attributes:
        to_canonical: nibabel orientation transform input -> RAS, (3, 2).
        slice_axis: the RAS axis that is sliced (moved last).
        plane_shape: in-plane shape (A, B) after reorientation.
        box: square crop (a0, b0, side) in-plane, may extend past the image (padded).
        low, high: per-channel intensity percentiles inside the foreground, (C,).
        kept: indices of the slices that are used, (N,).
        n_slices: number of slices along the slice axis.
        image_size: model size S.
    """

    to_canonical: np.ndarray
    slice_axis: int
    plane_shape: tuple[int, int]
    box: tuple[int, int, int]
    low: np.ndarray
    high: np.ndarray
    kept: np.ndarray
    n_slices: int
    image_size: int


def _to_plane_stack(volume: np.ndarray, transform: np.ndarray, slice_axis: int) -> np.ndarray:
    """(X, Y, Z) input grid -> (A, B, N) canonical in-plane x slices."""
    return np.moveaxis(orientations.apply_orientation(volume, transform), slice_axis, -1)


def _from_plane_stack(stack: np.ndarray, transform: np.ndarray, slice_axis: int) -> np.ndarray:
    """Inverse of `_to_plane_stack`."""
    canonical = np.moveaxis(stack, -1, slice_axis)
    return orientations.apply_orientation(canonical, _inverse(transform))


def _inverse(transform: np.ndarray) -> np.ndarray:
    """Orientation transform that undoes `transform` (both as nibabel ornt arrays)."""
    inverse = np.zeros_like(transform)
    for axis, (target, flip) in enumerate(transform):
        inverse[int(target)] = (axis, flip)
    return inverse


def to_plane_stack(volume: np.ndarray, state: PreprocessState) -> np.ndarray:
    """A volume on the input grid (X, Y, Z) -> (A, B, N): canonical in-plane axes, slices last.

    Slice k of the result is slice number k of `state` (as in `state.kept`), uncropped and at
    the input's resolution: the view in which per-slice scores are computed.
    """
    return _to_plane_stack(volume, state.to_canonical, state.slice_axis)


def input_slice_numbers(state: PreprocessState) -> np.ndarray:
    """The input file's voxel index along its sliced axis of each canonical slice k, (n_slices,) int64.

    Canonical slice k (as in `state.kept` and `to_plane_stack`) is the input's slice k, or
    n_slices - 1 - k when reorientation flipped that axis (e.g. an LPS-stored scan sliced
    sagittally): the number a viewer such as ITK-SNAP shows for it.
    """
    numbers = np.arange(state.n_slices, dtype=np.int64)
    for target, flip in state.to_canonical:
        if int(target) == state.slice_axis and flip < 0:
            return numbers[::-1].copy()
    return numbers


def in_plane_pixel_area(affine: np.ndarray, state: PreprocessState) -> float:
    """Area in mm^2 of one input voxel in the slicing plane (the two axes other than the slice axis)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    through = [i for i in range(3) if int(state.to_canonical[i, 0]) == state.slice_axis]
    return float(np.prod([spacing[i] for i in range(3) if i not in through]))


def explained_region(state: PreprocessState) -> np.ndarray:
    """Voxels of the input grid the model saw (kept slices, inside the crop box), (X, Y, Z) bool."""
    ones = torch.ones(len(state.kept), 1, state.image_size, state.image_size)
    return to_input_grid(ones, state, fill=0.0)[0] > 0.5


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Voxels clearly above background in any channel: > min + 10% of (p99 - min). data (C, *s) -> bool (*s)."""
    masks = []
    for channel in data:
        low, top = float(channel.min()), float(np.percentile(channel, 99))
        masks.append(channel > low + 0.1 * (top - low))
    return np.logical_or.reduce(masks)


def fit_preprocess(
    data: np.ndarray, affine: np.ndarray, cfg: DataConfig, brainmask: np.ndarray | None = None, source: str = "scan"
) -> PreprocessState:
    """Measure a volume (C, X, Y, Z) and decide how to preprocess it.

    Raises:
        InputError: no foreground, or a channel that is constant inside the foreground.
    """
    transform = orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt("RAS"))
    slice_axis = _SLICE_AXIS[cfg.slice_axis]
    fg = brainmask if brainmask is not None else foreground_mask(data)
    fg_stack = _to_plane_stack(fg.astype(np.uint8), transform, slice_axis) > 0
    if not fg_stack.any():
        raise InputError(f"{source}: no foreground (brain) voxels found")
    low = np.empty(data.shape[0], dtype=np.float32)
    high = np.empty(data.shape[0], dtype=np.float32)
    fg_input = fg.astype(bool)
    for c, channel in enumerate(data):
        values = channel[fg_input]
        low[c], high[c] = np.percentile(values, cfg.intensity_percentiles)
        if not high[c] > low[c]:
            raise InputError(f"{source}: channel {c} is constant inside the foreground")
    rows = np.flatnonzero(fg_stack.any(axis=(1, 2)))
    cols = np.flatnonzero(fg_stack.any(axis=(0, 2)))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    side = int(np.ceil(max(height, width) * (1 + 2 * cfg.crop_margin)))
    a0 = int(rows[0] + height // 2 - side // 2)
    b0 = int(cols[0] + width // 2 - side // 2)
    area = _crop(fg_stack.astype(np.float32), (a0, b0, side), 0.0).sum(axis=(0, 1)) / side**2
    kept = np.flatnonzero(area >= cfg.min_foreground_fraction)
    if kept.size == 0:
        kept = np.array([int(np.argmax(area))])
    return PreprocessState(
        to_canonical=transform,
        slice_axis=slice_axis,
        plane_shape=(int(fg_stack.shape[0]), int(fg_stack.shape[1])),
        box=(a0, b0, side),
        low=low,
        high=high,
        kept=kept,
        n_slices=int(fg_stack.shape[2]),
        image_size=cfg.image_size,
    )


def _crop(stack: np.ndarray, box: tuple[int, int, int], fill: float) -> np.ndarray:
    """Crop (A, B, ...) to the square box (side, side, ...), padding outside the image with fill."""
    a0, b0, side = box
    out = np.full((side, side, *stack.shape[2:]), fill, dtype=stack.dtype)
    sa, sb = max(a0, 0), max(b0, 0)
    ea, eb = min(a0 + side, stack.shape[0]), min(b0 + side, stack.shape[1])
    if ea > sa and eb > sb:
        out[sa - a0 : ea - a0, sb - b0 : eb - b0] = stack[sa:ea, sb:eb]
    return out


def _resize(slices: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, size, size), bilinear; antialiased when shrinking."""
    if slices.shape[-1] == size and slices.shape[-2] == size:
        return slices
    shrink = slices.shape[-1] > size
    return F.interpolate(slices, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def normalise(data: np.ndarray, state: PreprocessState, cfg: DataConfig) -> np.ndarray:
    """Map each channel's (low, high) percentiles to (-1, 1) and clip to cfg.clip_range. (C, *s)."""
    scale = (state.high - state.low).reshape(-1, *([1] * (data.ndim - 1)))
    out = (data - state.low.reshape(scale.shape)) / scale * 2 - 1
    return np.clip(out, *cfg.clip_range).astype(np.float32)


def denormalise_delta(delta: np.ndarray, state: PreprocessState) -> np.ndarray:
    """A change in normalised units back to intensity units, per channel. delta (C, *s)."""
    return delta * ((state.high - state.low) / 2).reshape(-1, *([1] * (delta.ndim - 1)))


def to_slices(data: np.ndarray, state: PreprocessState, cfg: DataConfig) -> torch.Tensor:
    """Volume (C, X, Y, Z) -> model input (N_kept, C, S, S) float32."""
    stacks = np.stack(
        [_to_plane_stack(c, state.to_canonical, state.slice_axis) for c in normalise(data, state, cfg)]
    )  # (C, A, B, N)
    cropped = _crop(np.moveaxis(stacks, 0, -1), state.box, BACKGROUND)  # (side, side, N, C)
    slices = torch.from_numpy(np.ascontiguousarray(cropped.transpose(2, 3, 0, 1)[state.kept]))
    return _resize(slices, state.image_size)


def mask_to_slices(mask: np.ndarray, state: PreprocessState) -> torch.Tensor:
    """A mask (X, Y, Z) -> (N_kept, S, S) bool at model resolution (area fraction > 0.5)."""
    stack = _to_plane_stack(mask.astype(np.float32), state.to_canonical, state.slice_axis)
    cropped = _crop(stack, state.box, 0.0).transpose(2, 0, 1)[state.kept]
    resized = _resize(torch.from_numpy(np.ascontiguousarray(cropped))[:, None], state.image_size)
    return resized[:, 0] > 0.5


def slice_lesion_pixels(mask: np.ndarray, state: PreprocessState) -> np.ndarray:
    """Lesion voxels per kept slice, counted on the input grid. mask (X, Y, Z) -> (N_kept,)."""
    stack = _to_plane_stack(mask.astype(np.uint8), state.to_canonical, state.slice_axis)
    return stack.reshape(-1, stack.shape[-1]).sum(axis=0)[state.kept].astype(np.int64)


def to_input_grid(slices: torch.Tensor | np.ndarray, state: PreprocessState, fill: float = 0.0) -> np.ndarray:
    """Undo the preprocessing geometry: (N_kept, C, S, S) -> (C, X, Y, Z) on the input grid.

    Slices that were not kept and voxels outside the crop box get `fill`.
    """
    array = torch.as_tensor(slices, dtype=torch.float32)
    side = state.box[2]
    resized = F.interpolate(array, size=(side, side), mode="bilinear", align_corners=False).numpy()
    a_len, b_len = state.plane_shape
    channels = resized.shape[1]
    stack = np.full((channels, a_len, b_len, state.n_slices), fill, dtype=np.float32)
    a0, b0, _ = state.box
    sa, sb = max(a0, 0), max(b0, 0)
    ea, eb = min(a0 + side, a_len), min(b0 + side, b_len)
    if ea > sa and eb > sb:
        region = resized[:, :, sa - a0 : ea - a0, sb - b0 : eb - b0]  # (N, C, ha, hb)
        stack[:, sa:ea, sb:eb, state.kept] = region.transpose(1, 2, 3, 0)
    return np.stack([_from_plane_stack(c, state.to_canonical, state.slice_axis) for c in stack])
