"""The per-slice review: planes at the input's resolution, their rendering, the montage, which slices."""

from pathlib import Path

import numpy as np
from PIL import Image

from anomaly_diffusion.config import DataConfig
from anomaly_diffusion.data.io import Scan
from anomaly_diffusion.data.transforms import fit_preprocess, input_slice_numbers, normalise
from anomaly_diffusion.plots import (
    _HOT,
    GREY_WINDOW,
    MAP_ALPHA,
    MONTAGE_MIN_PANEL,
    OUTLINE_RGB,
    explain_montage,
    outline,
    slice_views,
)
from anomaly_diffusion.scans import ScanExplanation, input_planes
from anomaly_diffusion.usecases.explain import review_selection


def test_outline_is_the_inner_boundary_of_the_mask() -> None:
    mask = np.zeros((7, 6), bool)
    mask[1:5, 2:6] = True  # touches the right image edge: that side is outline too
    expected = mask.copy()
    expected[2:4, 3:5] = False
    assert (outline(mask) == expected).all()
    assert not outline(np.zeros((3, 3), bool)).any()
    assert outline(np.ones((1, 4), bool)).all()


def test_slice_views_are_pixel_for_voxel_oriented_like_the_montages() -> None:
    """(A, B) plane -> (B, A, 3) image: first axis left to right, second bottom to top."""
    a_len, b_len = 9, 5
    image = np.full((a_len, b_len), GREY_WINDOW[0], np.float32)
    image[7, 1] = GREY_WINDOW[1]  # one white voxel
    views = slice_views(image, image, np.zeros_like(image), vmax=1.0)
    for rgb in (views.input, views.healthy, views.overlay):
        assert rgb.shape == (b_len, a_len, 3) and rgb.dtype == np.uint8
    white = np.argwhere(views.input[..., 0] == 255)
    assert white.tolist() == [
        [b_len - 1 - 1, 7]
    ]  # row counts down from the top: b = 1 is the second row from the bottom
    assert views.input.sum() == 255 * 3  # everything else black
    assert (views.overlay == views.input).all()  # a zero map paints nothing


def test_the_map_is_painted_above_its_floor_and_the_lesion_outline_is_cyan() -> None:
    shape = (12, 10)
    image = np.zeros(shape, np.float32)  # mid grey
    grey = round((0 - GREY_WINDOW[0]) / (GREY_WINDOW[1] - GREY_WINDOW[0]) * 255)
    anomaly_map = np.zeros(shape, np.float32)
    anomaly_map[2, 3] = 0.05  # below 10% of vmax: not painted
    anomaly_map[4, 4] = 2.0  # the top of the scale
    truth = np.zeros(shape, bool)
    truth[6:10, 5:9] = True
    views = slice_views(image, image, anomaly_map, vmax=2.0, truth=truth)
    assert (views.input == grey).all()

    def at(a: int, b: int) -> np.ndarray:
        return views.overlay[shape[1] - 1 - b, a]

    assert (at(2, 3) == grey).all()
    expected = np.round(MAP_ALPHA * _HOT[255] + (1 - MAP_ALPHA) * grey).astype(np.uint8)
    assert (at(4, 4) == expected).all()
    edge = outline(truth)
    for a, b in np.argwhere(edge):
        assert tuple(at(a, b)) == OUTLINE_RGB
    for a, b in np.argwhere(truth & ~edge):
        assert (at(a, b) == grey).all()  # inside the lesion: the scan, not the outline
    cyan = (views.overlay == OUTLINE_RGB).all(axis=-1)
    assert cyan.sum() == edge.sum()


def test_montage_shows_each_slice_pixel_for_voxel(tmp_path: Path) -> None:
    big = np.zeros((240, 200), np.float32)
    views = slice_views(big, big, big, vmax=1.0)
    path = explain_montage([(10, views), (11, views)], 1.0, tmp_path / "m.png")
    width, height = Image.open(path).size
    assert width == 3 * 240 + 4 * 8  # three panels of the input's own width, no resampling
    assert height > 2 * 200
    small = np.zeros((24, 20), np.float32)
    path = explain_montage([(3, slice_views(small, small, small, vmax=1.0))], 1.0, tmp_path / "s.png")
    zoom = -(-MONTAGE_MIN_PANEL // 24)
    assert Image.open(path).size[0] == 3 * 24 * zoom + 4 * 8  # tiny inputs: whole-number blocks per voxel


# the input's first axis is sliced (superior-inferior), stored flipped; the second is flipped too
AFFINE = np.array([[0, -1.0, 0, 5], [0, 0, 2.0, -3], [-1.5, 0, 0, 7], [0, 0, 0, 1]])


def test_input_slice_numbers_follow_the_file_when_reorientation_flips_the_sliced_axis() -> None:
    volume = np.zeros((1, 12, 30, 22), np.float32)
    volume[0, 2:10, 4:27, 3:19] = 1 + np.random.default_rng(0).random((8, 23, 16))
    state = fit_preprocess(volume, AFFINE, DataConfig(image_size=16, min_foreground_fraction=0.0))
    assert input_slice_numbers(state).tolist() == list(range(11, -1, -1))
    identity = fit_preprocess(volume, np.diag([1.0, 1, 1, 1]), DataConfig(image_size=16, min_foreground_fraction=0.0))
    assert input_slice_numbers(identity).tolist() == list(range(22))


def test_input_planes_keep_the_input_resolution_and_put_each_voxel_where_the_file_has_it() -> None:
    shape = (12, 30, 22)
    rng = np.random.default_rng(1)
    data = np.zeros((1, *shape), np.float32)
    data[0, 2:10, 4:27, 3:19] = 50 + rng.random((8, 23, 16)) * 50
    cfg = DataConfig(image_size=8, min_foreground_fraction=0.0)
    state = fit_preprocess(data, AFFINE, cfg)
    anomaly_map = np.zeros(shape, np.float32)
    voxel = (6, 20, 9)
    anomaly_map[voxel] = 1.0
    truth = anomaly_map > 0
    scan = Scan(data, AFFINE, shape, None, (Path("x.nii.gz"),))
    explanation = ScanExplanation(anomaly_map, data + 1.0, None, state, data[0] > 0, None)  # type: ignore[arg-type]
    planes = input_planes(scan, explanation, cfg, truth)
    a0, b0, side = state.box
    in_plane = (min(a0 + side, state.plane_shape[0]) - max(a0, 0), min(b0 + side, state.plane_shape[1]) - max(b0, 0))
    assert planes.image.shape == planes.anomaly_map.shape == (*in_plane, 12)
    assert in_plane[0] > cfg.image_size  # input resolution, not the model's 8x8
    a, b, k = np.argwhere(planes.anomaly_map == 1.0)[0]
    assert planes.truth is not None and planes.truth[a, b, k] and planes.truth.sum() == 1
    assert planes.numbers[k] == voxel[0]  # the voxel's slice, numbered as in the file
    expected = normalise(data, state, cfg)[0][voxel]
    assert planes.image[a, b, k] == expected
    healthy = normalise(data + 1.0, state, cfg)[0][voxel]
    assert planes.healthy[a, b, k] == healthy


def test_review_selection_caps_by_taking_every_kth_slice() -> None:
    kept = np.arange(10, 20)
    assert review_selection(kept, 200).tolist() == kept.tolist()
    assert review_selection(kept, 10).tolist() == kept.tolist()
    assert review_selection(kept, 4).tolist() == [10, 13, 16, 19]  # k = ceil(10 / 4) = 3
    assert review_selection(kept, 0).size == 0
