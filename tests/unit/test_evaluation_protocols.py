"""The evaluation's protocols on synthetic volumes with known answers: 3D post-processing, Dice with
small components dropped, per-slice Otsu Dice, means and intervals over patients, the small-lesion subgroup."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from model_support import tiny_bundle

from anomaly_diffusion.data.manifest import ManifestRow
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.evaluation.grammar import parse_method
from anomaly_diffusion.evaluation.methods import Method
from anomaly_diffusion.evaluation.postprocess import (
    PostProcess,
    candidate_thresholds,
    drop_small_components,
    eroded,
    median_3d,
)
from anomaly_diffusion.evaluation.report import flat_metrics, report_markdown
from anomaly_diffusion.evaluation.scoring import VolumeScores, score_volume
from anomaly_diffusion.evaluation.split_metrics import evaluate, evaluate_method
from anomaly_diffusion.metrics import auprc, per_slice_otsu_dice

METHOD = Method("m", "diffusion", 10, 0.0)
AFFINE = np.diag([1.2, 1.2, 2.5, 1.0])


def save(array: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path


def volume(
    subject: str, truth: np.ndarray, scores: np.ndarray, pixel_area_mm2: float = 1.0, region: np.ndarray | None = None
) -> VolumeScores:
    """VolumeScores of 3D (A, B, N) arrays, slices along the last axis, as `score_volume` makes them."""
    region = np.ones(truth.shape, bool) if region is None else region
    index = np.nonzero(region)
    lesion_per_slice = truth.sum(axis=(0, 1))
    return VolumeScores(
        subject=subject,
        truth=truth[index].astype(bool),
        slice_ids=index[2].astype(np.int64),
        scores={"m": scores[index].astype(np.float32)},
        pixel_area_mm2=pixel_area_mm2,
        healthy_slices=np.nonzero(lesion_per_slice == 0)[0],
        grid_shape=truth.shape,
        voxel_index=np.ravel_multi_index(index, truth.shape).astype(np.int32),
    )


def lesion_with_speckles(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4x4 lesion scored 1 and 12 isolated false-positive voxels in its slices also scored 1, on 0.05.

    A constant background keeps per-slice Otsu exact: a slice's threshold falls between 0.05 and 1
    (a constant slice flags nothing).
    """
    rng = np.random.default_rng(seed)
    truth = np.zeros((16, 16, 8), bool)
    truth[4:8, 4:8, 2:6] = True
    scores = np.full(truth.shape, 0.05)
    scores[truth] = 1.0
    placed = 0
    while placed < 12:  # isolated: no other flagged voxel in its 3x3x3 neighbourhood
        i, j, k = rng.integers(1, 15), rng.integers(1, 15), rng.integers(2, 6)
        if (scores[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] < 1).all():
            scores[i, j, k] = 1.0
            placed += 1
    return truth, scores


def test_3d_median_erosion_and_components() -> None:
    spike = np.zeros((5, 5, 5))
    spike[2, 2, 2] = 9.0
    assert median_3d(spike, 3).max() == 0 and median_3d(spike, 1) is spike
    block = np.zeros((7, 7, 7))
    block[1:6, 1:6, 1:6] = 1.0
    assert np.array_equal(median_3d(block, 3)[2:5, 2:5, 2:5], np.ones((3, 3, 3)))  # the block's core survives
    cube = np.zeros((9, 9, 9), bool)
    cube[1:8, 1:8, 1:8] = True  # 7^3
    assert eroded(cube, 1).sum() == 5**3 and eroded(cube, 2).sum() == 3**3 and eroded(cube, 0).sum() == 7**3
    binary = np.zeros((10, 10, 10), bool)
    binary[0:3, 0:3, 0:3] = True  # 27 voxels
    binary[6, 6, 6] = binary[7, 7, 7] = True  # 2 voxels touching by a corner: one 26-connected component
    binary[9, 0, 9] = True  # 1 voxel
    kept = drop_small_components(binary, 2)
    assert kept.sum() == 29 and not kept[9, 0, 9]
    assert drop_small_components(binary, 28).sum() == 0 and drop_small_components(binary, 0).sum() == 30
    grid = candidate_thresholds(np.arange(100000, dtype=np.float64))
    assert np.all(np.diff(grid) > 0) and grid[0] == pytest.approx(50000) and grid[0] < 50000 and len(grid) == 24
    for bad, message in (({"median_3d": 99}, "median-3d"), ({"erode": -1}, "erode"), ({"min_component": -2}, "min")):
        with pytest.raises(ConfigError, match=message):
            PostProcess(**bad)  # type: ignore[arg-type]
    assert PostProcess(3, 2, 10).describe() == (
        "3D median 3, brain mask eroded by 2 voxel(s), binary components < 10 voxels dropped"
    )


def test_dropping_small_components_removes_isolated_false_positives_from_every_dice() -> None:
    volumes = [volume(f"p{i}", *lesion_with_speckles(i)) for i in range(3)]
    val = [volume("v", *lesion_with_speckles(9))]
    plain = evaluate_method(volumes, METHOD, val, bootstrap=20)
    # the lesion (64 voxels) and 12 speckles share the top score: the best any threshold can do
    assert plain.dice_best == pytest.approx(2 * 64 / (2 * 64 + 12))
    assert plain.dice_chosen == pytest.approx(plain.dice_best)
    cleaned = evaluate_method(volumes, METHOD, val, bootstrap=20, postprocess=PostProcess(min_component=5))
    assert cleaned.dice_best == 1.0 and cleaned.dice_chosen == 1.0
    assert cleaned.ci["dice_best"] == (1.0, 1.0)
    # per-slice Otsu binarises each slice, then the 3D components go: only the lesion is left
    assert cleaned.dice_slice_otsu == 1.0 and plain.dice_slice_otsu < 1.0
    # the continuous metrics do not depend on binary post-processing
    assert cleaned.auroc == plain.auroc and cleaned.auprc == plain.auprc
    # leave one volume out chooses among the same candidates
    loo = evaluate_method(volumes, METHOD, None, bootstrap=0, postprocess=PostProcess(min_component=5))
    assert loo.dice_chosen == 1.0


def test_per_slice_otsu_dice_is_wolleb_protocol() -> None:
    truth = np.zeros((8, 8, 3), bool)
    truth[2:4, 2:4, 0] = True  # slice 0: a perfectly separated lesion
    truth[0:4, 0:8, 1] = True  # slice 1: half the slice, and the map marks the other half
    scores = np.where(truth, 1.0, 0.0)
    scores[:, :, 1] = np.where(truth[:, :, 1], 0.0, 1.0)
    v = volume("p", truth, scores)
    result = evaluate_method([v], METHOD, bootstrap=0)
    assert per_slice_otsu_dice(v.scores["m"], v.truth, v.slice_ids) == {0: 1.0, 1: 0.0}
    assert result.dice_slice_otsu == 0.5  # mean over diseased slices; slice 2 (healthy) left out


def test_an_eroded_rim_is_no_mode_of_the_per_slice_otsu_threshold() -> None:
    """Erosion floors the rim's scores; Otsu must not split floor vs brain (it would flag the whole brain)."""
    truth = np.zeros((12, 12, 3), bool)
    truth[5:7, 5:7, :] = True
    scores = np.full(truth.shape, 0.2)
    scores[truth] = 0.9
    rim = np.ones(truth.shape, bool)
    rim[2:10, 2:10, :] = False
    scores[rim] = 0.0  # the floor
    v = volume("p", truth, scores)
    assert evaluate_method([v], METHOD, bootstrap=0).dice_slice_otsu < 0.2  # 0 | {0.2, 0.9}: the brain is flagged
    v.eroded_out = rim[np.nonzero(np.ones(truth.shape, bool))]
    result = evaluate_method([v], METHOD, bootstrap=0)
    assert result.dice_slice_otsu == 1.0 and result.dice_best == 1.0


def test_means_and_intervals_over_patients() -> None:
    rng = np.random.default_rng(0)
    truth = np.zeros((6, 6, 4), bool)
    truth[1:3, 1:3, 1:3] = True
    perfect = np.where(truth, 1.0, 0.0) + 0.01 * rng.random(truth.shape)
    constant = np.full(truth.shape, 0.3)  # uninformative: AUROC 0.5
    patients = [volume(f"p{i}", truth, perfect if i % 2 == 0 else constant) for i in range(6)]
    result = evaluate_method(patients, METHOD, bootstrap=200)
    assert result.per_volume["p0"]["auroc"] == 1.0 and result.per_volume["p1"]["auroc"] == 0.5
    assert result.per_patient["auroc"] == pytest.approx(0.75)
    low, high = result.ci["patient.auroc"]
    assert 0.5 <= low < 0.75 < high <= 1.0
    for key in ("dice_chosen", "slice_auroc_max", "auroc", "dice_best"):
        low, high = result.ci[key]
        assert low <= high, key
    report = evaluate(patients, [METHOD], "test", bootstrap=50)
    text = report_markdown(report)
    assert "### Per patient (mean over volumes)" in text and "| m | 0.750 [" in text
    assert flat_metrics(report)["m.patient_mean_auroc"] == pytest.approx(0.75)


def test_small_lesion_slices_are_a_subgroup_by_area() -> None:
    truth = np.zeros((20, 20, 2), bool)
    truth[2:5, 2:5, 0] = True  # 9 voxels: 9 mm^2 at 1 mm^2 per voxel: small (< 100 mm^2)
    truth[5:17, 5:17, 1] = True  # 144 voxels: 144 mm^2: medium
    rng = np.random.default_rng(1)
    scores = rng.random(truth.shape) + np.where(truth, 0.5, 0.0)
    volumes = [volume(f"p{i}", truth, scores + 0.01 * i) for i in range(4)]
    result = evaluate_method(volumes, METHOD, bootstrap=100)
    assert result.by_size["small"]["slices"] == 4 and result.by_size["medium"]["slices"] == 4
    in_small = np.concatenate([v.slice_ids == 0 for v in volumes])
    pooled_scores = np.concatenate([v.scores["m"] for v in volumes])
    pooled_truth = np.concatenate([v.truth for v in volumes])
    assert result.by_size["small"]["auprc"] == pytest.approx(auprc(pooled_scores[in_small], pooled_truth[in_small]))
    low, high = result.ci["small.auprc"]
    assert low <= result.by_size["small"]["auprc"] + 0.05 and high >= result.by_size["small"]["auprc"] - 0.05
    # the same lesion at 4 mm^2 per voxel: 36 mm^2 and 576 mm^2, still small and medium; at 12 mm^2: medium, large
    coarse = evaluate_method([volume("p", truth, scores, pixel_area_mm2=12.0)], METHOD, bootstrap=0)
    assert coarse.by_size["small"]["slices"] == 0 and coarse.by_size["large"]["slices"] == 1


def test_score_volume_applies_3d_median_and_erosion_to_every_method(tmp_path: Path) -> None:
    """An intensity method through the real scoring path: erosion floors the brain's rim, the 3D median smooths."""
    shape = (12, 12, 8)
    image = np.zeros(shape, np.float32)
    brain = np.zeros(shape, np.uint8)
    brain[1:11, 1:11, 1:7] = 1
    rng = np.random.default_rng(0)
    image[brain > 0] = 100 + 10 * rng.standard_normal(int(brain.sum()))
    mask = np.zeros(shape, np.uint8)
    mask[5:7, 5:7, 3:5] = 1
    image[mask > 0] += 80
    row = ManifestRow(
        subject="s",
        split="test",
        images=(save(image, tmp_path / "t1.nii.gz"),),
        mask=save(mask, tmp_path / "mask.nii.gz"),
        brainmask=save(brain, tmp_path / "brain.nii.gz"),
    )
    bundle = tiny_bundle()
    bundle.config = bundle.config.model_copy(
        update={"data": bundle.config.data.model_copy(update={"min_foreground_fraction": 0.0})}
    )
    method = parse_method("intensity", bundle.config)
    plain = score_volume(bundle, row, [method])
    floor = bundle.config.data.clip_range[0]
    assert (plain.scores["intensity"] > floor).mean() > 0.5
    rim = score_volume(bundle, row, [method], postprocess=PostProcess(erode=1))
    assert rim.voxel_index.shape == rim.truth.shape and np.prod(rim.grid_shape) >= rim.truth.size
    inner = eroded(brain > 0, 1)
    # voxels of the brain's outer shell now score the floor, the rest is untouched
    brain_grid = rim.from_grid(rim.to_grid(np.ones(rim.truth.shape, bool), False))
    assert brain_grid.all()
    changed = rim.scores["intensity"] != plain.scores["intensity"]
    assert changed.any() and np.all(rim.scores["intensity"][changed] == floor)
    assert changed.sum() <= int(brain.sum() - inner.sum())
    smooth = score_volume(bundle, row, [method], postprocess=PostProcess(median_3d=3))
    assert smooth.scores["intensity"].std() < plain.scores["intensity"].std()
