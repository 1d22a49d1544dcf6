from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_diffusion.config import DataConfig
from anomaly_diffusion.data.datasets import load_slices
from anomaly_diffusion.data.manifest import read_manifest
from anomaly_diffusion.data.transforms import fit_preprocess, mask_to_slices, normalise, to_input_grid, to_slices
from anomaly_diffusion.errors import InputError
from anomaly_diffusion.labels import HEALTHY, PATHOLOGICAL

# an oblique-free but flipped, permuted affine: the slice axis (S) is the input's first axis
AFFINE = np.array([[0, -1.0, 0, 5], [0, 0, 2.0, -3], [-1.5, 0, 0, 7], [0, 0, 0, 1]])


def _volume(shape: tuple[int, int, int] = (12, 30, 22)) -> np.ndarray:
    rng = np.random.default_rng(0)
    volume = np.zeros((1, *shape), np.float32)
    volume[0, 2:10, 4:27, 3:19] = 50 + rng.random((8, 23, 16)) * 50
    return volume


def test_preprocessing_inverse_puts_each_voxel_back() -> None:
    volume = _volume()
    side_cfg = DataConfig(image_size=16, min_foreground_fraction=0.0)
    state = fit_preprocess(volume, AFFINE, side_cfg)
    # at the crop's own size resizing is the identity: the round trip is exact for every voxel
    cfg = DataConfig(image_size=state.box[2], min_foreground_fraction=0.0, crop_margin=side_cfg.crop_margin)
    state = fit_preprocess(volume, AFFINE, cfg)
    assert state.n_slices == 12  # the input's first axis is superior-inferior: it is sliced
    back = to_input_grid(to_slices(volume, state, cfg), state, fill=-1.0)
    assert back.shape == volume.shape
    assert np.allclose(back, normalise(volume, state, cfg), atol=1e-6)


def test_a_marked_voxel_returns_to_its_index_after_resize() -> None:
    volume = _volume()
    cfg = DataConfig(image_size=16, min_foreground_fraction=0.0)
    state = fit_preprocess(volume, AFFINE, cfg)
    marked = np.zeros(volume.shape[1:], np.float32)
    index = (5, 14, 10)
    marked[index] = 1.0
    slices = mask_to_slices(marked > 0, state).float()  # nearest-ish at model size
    spot = to_slices(
        np.stack([marked * 1000]),
        state,
        DataConfig(image_size=16, min_foreground_fraction=0.0, intensity_percentiles=(0, 100), clip_range=(-1, 1e6)),
    )
    back = to_input_grid(spot, state)[0]
    assert np.unravel_index(np.argmax(back), back.shape) == index
    assert slices.shape[1:] == (16, 16)


def test_kept_slices_and_normalisation() -> None:
    volume = _volume()
    cfg = DataConfig(image_size=16, min_foreground_fraction=0.2)
    state = fit_preprocess(volume, AFFINE, cfg)
    assert set(state.kept.tolist()) <= set(range(12)) and len(state.kept) < 12
    x = to_slices(volume, state, cfg)
    assert x.shape == (len(state.kept), 1, 16, 16)
    assert x.min() >= -1 and x.max() <= 3
    assert torch.isfinite(x).all()


def test_empty_or_constant_scans_are_refused() -> None:
    with pytest.raises(InputError, match="no foreground"):
        fit_preprocess(np.zeros((1, 8, 8, 4), np.float32), np.eye(4), DataConfig(image_size=16))


def test_slice_labels_come_from_the_mask(tiny_dataset: Path) -> None:
    cfg = DataConfig(image_size=16, min_foreground_fraction=0.0)
    data = load_slices(read_manifest(tiny_dataset, splits=["train"]), cfg)
    assert data.summary()["subjects"] == 4
    assert data.count(PATHOLOGICAL) > 0 and data.count(HEALTHY) > 0
    for label, mask in zip(data.labels, data.lesion_masks, strict=True):
        if label == HEALTHY:
            assert not mask.any()
    assert data.images.shape[1:] == (1, 16, 16)
