"""Evaluation metrics against hand computations and an independent re-implementation of ImageReward's test loop."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from support import official_test_loop, shared_file

from rewardlab.data import count_pairs, load_imagereward
from rewardlab.eval import PairwiseAccuracy, RecallFilterAtK, rank_generators, tie_calibrated_accuracy


def test_hand_computed_accuracy_ties_single_and_all_equal():
    acc = PairwiseAccuracy()
    acc.update([3.0, 2.0, 1.0], [1, 2, 3])  # 3 of 3
    acc.update([1.0, 1.0, 0.0], [1, 1, 2])  # human tie skipped; 2 of 2
    acc.update([5.0, 5.0], [1, 2])  # predicted tie: wrong, 0 of 1
    acc.update([0.7], [1])  # single image: no pairs
    out = acc.compute()
    assert out["accuracy"] == pytest.approx(5 / 6)
    assert out["pairs"] == 6 and out["tied_pairs"] == 1 and out["groups"] == 4
    assert out["macro_accuracy"] == pytest.approx((1 + 1 + 0) / 3)
    same = PairwiseAccuracy()
    same.update([2.0, 2.0, 2.0], [1, 2, 3])
    assert same.compute()["accuracy"] == 0.0


def test_pooled_versus_macro():
    acc = PairwiseAccuracy()
    acc.update([1.0, 0.0], [1, 2])  # 1/1
    acc.update([0.0, 1.0, 2.0], [1, 2, 3])  # 0/3 ... reversed
    acc.update([2.0, 0.0, 1.0], [1, 2, 3])  # (0,1) ok, (0,2) ok, (1,2) wrong: 2/3
    out = acc.compute()
    assert out["accuracy"] == pytest.approx(3 / 7)
    assert out["macro_accuracy"] == pytest.approx((1 + 0 + 2 / 3) / 3)


def test_tie_calibration_by_hand():
    # pairs: (Δ, human): (0.05, tie) (0.1, +1) (-0.3, +1) (0.5, +1) (0.02, tie)
    deltas = np.array([0.05, 0.1, -0.3, 0.5, 0.02])
    human = np.array([0, 1, 1, 1, 0])
    # ε < 0.02: 2 right (0.1, 0.5) of 5; ε = 0.05: both ties + 0.1 + 0.5 = 4 of 5; ε = 0.1: 2 ties + 0.5 = 3
    accuracy, epsilon = tie_calibrated_accuracy(deltas, human)
    assert accuracy == pytest.approx(4 / 5) and epsilon == pytest.approx(0.05)


def test_recall_and_filter_by_hand():
    metric = RecallFilterAtK((1, 2))
    metric.update([0.9, 0.1, 0.5, 0.3], [1, 4, 2, 3])  # model top1 = human best; bottom1 = human worst
    metric.update([0.1, 0.9, 0.5, 0.3], [1, 2, 3, 4])  # best is model's last; worst (idx 3) is model's 3rd
    metric.update([0.5, 0.5], [1, 1])  # all tied: skipped
    metric.update([0.2, 0.1], [1, 2])  # only 2 candidates: counts for K=1 only
    out = metric.compute()
    assert out["recall@1"] == pytest.approx(2 / 3)  # groups 1 and 4
    assert out["filter@1"] == pytest.approx(2 / 3)  # groups 1 and 4
    assert out["recall@2"] == pytest.approx(1 / 2)  # group 1 yes; group 2: top2 = idx 1, 2 -> no
    assert out["filter@2"] == pytest.approx(2 / 2)  # group 2: bottom2 = idx 3, 0 -> worst idx 3 in


def test_merge_equals_single_pass_and_bootstrap_brackets():
    rng = np.random.default_rng(3)
    groups = [(rng.normal(size=5), rng.permutation(5) + 1) for _ in range(40)]
    whole, left, right = PairwiseAccuracy(), PairwiseAccuracy(), PairwiseAccuracy()
    for n, (s, r) in enumerate(groups):
        whole.update(s, r)
        (left if n % 2 else right).update(s, r)
    left.merge(right)
    a, b = whole.compute(), left.compute()
    assert a["accuracy"] == b["accuracy"] and a["pairs"] == b["pairs"] == 400
    low, high = a["ci95"]
    assert low < a["accuracy"] < high and high - low < 0.3


def test_real_imagereward_test_split_counts_and_official_loop():
    groups = load_imagereward(shared_file("test.json"))
    assert len(groups) == 466
    assert count_pairs(groups) == (6399, 831)
    rng = np.random.default_rng(0)
    scores = [rng.normal(size=g.size) for g in groups]
    scores[0][:] = 1.0  # some predicted ties too
    acc = PairwiseAccuracy()
    for s, g in zip(scores, groups, strict=True):
        acc.update(s, g.ranking)
    expected, total = official_test_loop(scores, [g.ranking for g in groups])
    assert total == 6399
    assert acc.compute()["accuracy"] == pytest.approx(expected, abs=1e-12)


def test_generator_ranking_correlations():
    means = {"sd15": 0.1, "sdxl": 0.5, "dalle2": 0.3, "vq": -0.2}
    human = {"sdxl": 1, "dalle2": 2, "sd15": 3, "vq": 4}
    out = rank_generators(means, human)
    assert out["order"] == ["sdxl", "dalle2", "sd15", "vq"]
    assert out["spearman"] == pytest.approx(1.0) and out["kendall"] == pytest.approx(1.0)
    swapped = rank_generators(means, {"sdxl": 2, "dalle2": 1, "sd15": 3, "vq": 4})
    assert swapped["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15))  # one adjacent swap: d² sum 2
    assert swapped["kendall"] == pytest.approx((5 - 1) / 6)


def test_pair_helpers_cover_every_order():
    from rewardlab.data import ranked_pairs

    for ranking in itertools.permutations([1, 2, 2]):
        pairs = list(ranked_pairs(ranking))
        assert len(pairs) == 2 and all(ranking[a] < ranking[b] for a, b in pairs)
