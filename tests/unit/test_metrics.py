"""Metric functions against hand-computed values on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly_diffusion.metrics import (
    auprc,
    auroc,
    best_dice,
    bootstrap_interval,
    confusion_at,
    counts_dice,
    counts_metrics,
    dice,
    histogram_counts,
    per_slice_otsu_dice,
    pixel_metrics,
    size_bin,
    slice_scores,
    threshold_at_fpr,
)

TRUTH = np.array([0, 0, 0, 1, 1, 0, 0, 1], bool)


def test_perfect_map_scores_one_and_inverted_map_scores_zero() -> None:
    perfect = TRUTH.astype(float) * 0.9 + 0.05
    assert auroc(perfect, TRUTH) == 1.0
    assert auprc(perfect, TRUTH) == 1.0
    assert best_dice(perfect, TRUTH)[0] == 1.0
    assert pixel_metrics(perfect, TRUTH).dice_otsu == 1.0
    assert auroc(-perfect, TRUTH) == 0.0


def test_hand_computed_auroc_auprc_and_dice() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1], bool)
    # pairs (pos, neg): (0.35,0.1) ok, (0.35,0.4) wrong, (0.8,*) ok -> 3/4
    assert auroc(scores, labels) == pytest.approx(0.75)
    # ranked: 0.8 (P) p=1 r=.5, 0.4 (N), 0.35 (P) p=2/3 r=1 -> AP = .5*1 + .5*2/3
    assert auprc(scores, labels) == pytest.approx(0.5 + 1 / 3)
    # best Dice: threshold at 0.8 -> TP1 FP0 FN1 -> 2/3; at 0.35 -> TP2 FP1 -> 4/5
    assert best_dice(scores, labels)[0] == pytest.approx(0.8)
    assert confusion_at(scores, labels, 0.3).tolist() == [2, 1, 0]
    assert counts_dice(np.array([2, 1, 0])) == pytest.approx(0.8)
    # elementwise over (..., 3) counts; nothing to find and nothing found is 1
    assert counts_dice(np.array([[2, 1, 0], [0, 0, 0], [0, 3, 2]])).tolist() == pytest.approx([0.8, 1.0, 0.0])


def test_empty_mask_is_stated_not_guessed() -> None:
    empty = np.zeros(5, bool)
    scores = np.linspace(0, 1, 5)
    assert math.isnan(auroc(scores, empty)) and math.isnan(auprc(scores, empty))
    assert math.isnan(best_dice(scores, empty)[0])
    # nothing to find and nothing found is a perfect Dice; finding something is a Dice of 0
    assert dice(np.zeros(5, bool), empty) == 1.0
    assert dice(scores > 0.5, empty) == 0.0
    assert counts_dice(np.zeros(3, np.int64)) == 1.0


def test_per_slice_otsu_dice_skips_lesion_free_slices() -> None:
    slice_ids = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    truth = np.array([0, 0, 1, 1, 0, 0, 0, 0], bool)
    scores = np.array([0.0, 0.0, 0.9, 1.0, 0.0, 0.2, 0.1, 0.3])
    result = per_slice_otsu_dice(scores, truth, slice_ids)
    assert result == {0: 1.0}


def test_threshold_at_fpr_flags_at_most_that_share_of_healthy_voxels() -> None:
    healthy = np.arange(100, dtype=float)
    for fpr in (0.01, 0.05, 0.2):
        threshold = threshold_at_fpr(healthy, fpr)
        assert (healthy > threshold).mean() <= fpr
    assert math.isnan(threshold_at_fpr(np.array([]), 0.05))
    with pytest.raises(ValueError):
        threshold_at_fpr(healthy, 0.0)


def test_slice_scores_max_and_mean() -> None:
    ids, maxima = slice_scores(np.array([1.0, 3.0, 2.0, 5.0]), np.array([4, 4, 7, 7]), "max")
    assert ids.tolist() == [4, 7] and maxima.tolist() == [3.0, 5.0]
    _, means = slice_scores(np.array([1.0, 3.0, 2.0, 5.0]), np.array([4, 4, 7, 7]), "mean")
    assert means.tolist() == [2.0, 3.5]


def test_binned_curve_metrics_equal_scikit_learn_when_each_score_has_its_bin() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.2
    scores = np.round(rng.random(300) + labels * 0.4, 2)  # ties on purpose
    edges = np.r_[np.unique(scores), scores.max() + 1]
    pos, neg = histogram_counts(scores, labels, edges)
    got = counts_metrics(pos, neg)
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert got["auprc"] == pytest.approx(average_precision_score(labels, scores))
    assert got["dice_best"] == pytest.approx(best_dice(scores, labels)[0])


def test_bootstrap_interval_is_seeded_and_brackets_a_constant() -> None:
    values = np.array([0.2, 0.4, 0.6, 0.8])

    def mean_of(indices: np.ndarray) -> float:
        return float(values[indices].mean())

    first = bootstrap_interval(mean_of, 4, 200, seed=1)
    assert first == bootstrap_interval(mean_of, 4, 200, seed=1)
    assert 0.2 <= first[0] < 0.5 < first[1] <= 0.8
    assert bootstrap_interval(lambda i: 0.7, 3, 50) == pytest.approx((0.7, 0.7))
    assert all(math.isnan(v) for v in bootstrap_interval(mean_of, 1, 50))


def test_size_bins() -> None:
    assert [size_bin(a) for a in (0.0, 99.9, 100.0, 999.0, 1000.0, 5e4)] == [
        "small",
        "small",
        "medium",
        "medium",
        "large",
        "large",
    ]
