"""Every method's scores on the same voxels of one volume, made through explain's public pipeline.

Scored voxels: the brain/foreground voxels of the slices the model sees, on the input's own grid
(nothing is scored at model resolution). Methods sharing an encoding (`ExplainSettings.encode_key`)
share it, and with the same s and guidance one decoding; the residual only changes the map.
Every map goes through the same filters (in-plane median, then `PostProcess`'s 3D median and
brain-mask erosion) before its scored voxels are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.ndimage import median_filter

from anomaly_diffusion.config import Config
from anomaly_diffusion.counterfactual.cache import SliceDecodings
from anomaly_diffusion.counterfactual.slices import region_period
from anomaly_diffusion.data.io import load_scan, read_mask
from anomaly_diffusion.data.manifest import ManifestRow
from anomaly_diffusion.data.transforms import (
    explained_region,
    in_plane_pixel_area,
    mask_to_slices,
    normalise,
    to_plane_stack,
)
from anomaly_diffusion.errors import InputError
from anomaly_diffusion.evaluation.methods import Method
from anomaly_diffusion.evaluation.postprocess import NO_POSTPROCESS, PostProcess, eroded, median_3d
from anomaly_diffusion.evaluation.quality import counterfactual_quality
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.scans import assemble_scan, prepare_scan


@dataclass(frozen=True)
class SliceExample:
    """Model-resolution views of one slice for figures (channel 0).

    Attributes:
        x, x_healthy, anomaly_map: (S, S) input, counterfactual and map; truth: (S, S) bool.
    """

    x: np.ndarray
    x_healthy: np.ndarray
    anomaly_map: np.ndarray
    truth: np.ndarray


@dataclass
class VolumeScores:
    """Every method's voxel scores on the scored voxels of one volume.

    Attributes:
        subject: the manifest's subject id.
        truth: (V,) bool, lesion voxels among the scored voxels.
        slice_ids: (V,) slice number of each voxel.
        scores: method name -> (V,) float32 scores.
        pixel_area_mm2: in-plane area of one voxel.
        healthy_slices: slice numbers with fewer than `min_lesion_pixels` lesion voxels.
        p_healthy: method name -> (before, after) mean p(healthy | x, t=0) over slices.
        quality: method name -> its counterfactuals' quality values (`quality.counterfactual_quality`).
        examples: slice number -> model-resolution views for the first diffusion method.
        grid_shape: the shape of the scored voxels' bounding box in the plane stack (A, B, N).
        voxel_index: (V,) each scored voxel's flat (C-order) index in that box, for 3D
            operations on binary maps (connected components).
        eroded_out: (V,) bool, voxels outside the eroded brain mask (`PostProcess.erode`): they
            score the floor and no binary map flags them.
    """

    subject: str
    truth: np.ndarray
    slice_ids: np.ndarray
    scores: dict[str, np.ndarray]
    pixel_area_mm2: float
    healthy_slices: np.ndarray
    p_healthy: dict[str, tuple[float, float]] = field(default_factory=dict)
    quality: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: dict[int, SliceExample] = field(default_factory=dict)
    grid_shape: tuple[int, ...] = ()
    voxel_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    eroded_out: np.ndarray | None = None

    def healthy_voxels(self) -> np.ndarray:
        """(V,) bool: voxels of lesion-free slices."""
        return np.isin(self.slice_ids, self.healthy_slices)

    def to_grid(self, values: np.ndarray, fill: float | bool = 0) -> np.ndarray:
        """(V,) values of the scored voxels -> their bounding box `grid_shape`, `fill` elsewhere."""
        grid = np.full(int(np.prod(self.grid_shape)), fill, dtype=values.dtype)
        grid[self.voxel_index] = values
        return grid.reshape(self.grid_shape)

    def from_grid(self, grid: np.ndarray) -> np.ndarray:
        """The scored voxels' values of a `grid_shape` array, (V,)."""
        return grid.reshape(-1)[self.voxel_index]


def score_volume(
    bundle: ModelBundle,
    row: ManifestRow,
    methods: Sequence[Method],
    median_size: int = 0,
    progress: Callable[[str], None] | None = None,
    postprocess: PostProcess = NO_POSTPROCESS,
) -> VolumeScores:
    """Explain one manifest volume with every method and keep the scores of its scored voxels.

    Scored voxels: the brain mask (or the foreground threshold) inside the slices the model sees.
    With `median_size` > 1 every map is median-filtered in-plane (size x size) first; then
    `postprocess` filters it in 3D and sets the scores outside the eroded brain mask to the
    method's floor (0 for a residual map, the clip range's low end for an intensity).
    """
    cfg: Config = bundle.config
    if row.mask is None:
        raise InputError(f"subject {row.subject!r} has no lesion mask: evaluation needs ground truth")
    scan = load_scan(row.images, expected_channels=cfg.data.image_channels)
    truth_volume = read_mask(row.mask, scan)
    brain = read_mask(row.brainmask, scan) if row.brainmask else None
    prepared = prepare_scan(cfg.data, scan, brain)
    state = prepared.state
    region = to_plane_stack((explained_region(state) & prepared.foreground).astype(np.uint8), state) > 0
    index = np.nonzero(region)
    truth_stack = to_plane_stack(truth_volume.astype(np.uint8), state) > 0
    inner = to_plane_stack(eroded(prepared.foreground, postprocess.erode).astype(np.uint8), state)[index] > 0
    low = np.array([axis.min() for axis in index]) if index[0].size else np.zeros(3, np.int64)
    high = np.array([axis.max() + 1 for axis in index]) if index[0].size else np.zeros(3, np.int64)
    box = tuple(int(n) for n in high - low)
    voxel_index = np.ravel_multi_index(tuple(axis - lo for axis, lo in zip(index, low, strict=True)), box)

    def voxels(volume: np.ndarray, size: int, floor: float) -> np.ndarray:
        stack = to_plane_stack(volume.astype(np.float32), state)
        if size > 1:
            stack = median_filter(stack, size=(size, size, 1))
        scores = median_3d(stack, postprocess.median_3d)[index].astype(np.float32)
        return np.where(inner, scores, np.float32(floor))

    lesion_per_slice = truth_stack.sum(axis=(0, 1))
    healthy_slices = np.array([k for k in state.kept if lesion_per_slice[k] < cfg.data.min_lesion_pixels], dtype=int)
    scores: dict[str, np.ndarray] = {}
    p_healthy: dict[str, tuple[float, float]] = {}
    quality: dict[str, dict[str, float]] = {}
    period = region_period(bundle)
    examples: dict[int, SliceExample] = {}
    cache = SliceDecodings(bundle, prepared.x)
    truth_slices = mask_to_slices(truth_volume, state)
    normalised: np.ndarray | None = None  # the intensity baselines' input, made once per volume
    for method in methods:
        if progress is not None:
            progress(method.name)
        size = median_size if method.median is None else method.median
        if method.kind == "intensity":
            if normalised is None:
                normalised = normalise(scan.data, state, cfg.data)
            scores[method.name] = voxels(normalised[method.channel], size, cfg.data.clip_range[0])
            continue
        parts = [cache.explanation(plan) for plan in method.plans]
        # an ensemble's map is the mean of its parts' maps; its counterfactual is the first part's
        combined = replace(parts[0], anomaly_map=torch.stack([p.anomaly_map for p in parts]).mean(dim=0))
        explanation = assemble_scan(scan, prepared, combined)
        scores[method.name] = voxels(explanation.anomaly_map, size, 0.0)
        sl = explanation.slices
        p_healthy[method.name] = (float(sl.p_healthy_before.mean()), float(sl.p_healthy_after.mean()))
        quality[method.name] = counterfactual_quality(
            sl.x, sl.x_healthy, truth_slices, prepared.slice_foreground, sl.p_healthy_after, period
        )
        if not examples:
            for i, k in enumerate(state.kept.tolist()):
                examples[k] = SliceExample(
                    x=sl.x[i, 0].numpy(),
                    x_healthy=sl.x_healthy[i, 0].numpy(),
                    anomaly_map=sl.anomaly_map[i].numpy(),
                    truth=truth_slices[i].numpy(),
                )
    return VolumeScores(
        subject=row.subject,
        truth=truth_stack[index],
        slice_ids=index[2].astype(np.int64),
        scores=scores,
        pixel_area_mm2=in_plane_pixel_area(scan.affine, state),
        healthy_slices=healthy_slices,
        p_healthy=p_healthy,
        quality=quality,
        examples=examples,
        grid_shape=box,
        voxel_index=voxel_index.astype(np.int32 if np.prod(box) < 2**31 else np.int64),
        eroded_out=~inner if postprocess.erode > 0 else None,
    )


ScoreProgress = Callable[[int, int, str, str], None]
"""(volume index, volumes in total, subject, method being run)."""


def score_volumes(
    bundle: ModelBundle,
    rows: Sequence[ManifestRow],
    methods: Sequence[Method],
    median_size: int = 0,
    progress: ScoreProgress | None = None,
    postprocess: PostProcess = NO_POSTPROCESS,
) -> list[VolumeScores]:
    """`score_volume` of each row, in order, reporting (volume, total, subject, method) progress."""
    scored = []
    for i, row in enumerate(rows):

        def step(method: str, i: int = i, row: ManifestRow = row) -> None:
            if progress is not None:
                progress(i, len(rows), row.subject, method)

        scored.append(score_volume(bundle, row, methods, median_size, step, postprocess))
    if progress is not None and rows:
        progress(len(rows), len(rows), rows[-1].subject, "")
    return scored
