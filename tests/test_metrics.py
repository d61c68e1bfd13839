"""Metric functions: hand-computed cases, then agreement with naive references on random rankings."""

import random

import numpy as np
import pytest

from cirkit import metrics as M


def test_recall_at_k_hand_computed():
    ranked = [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"]]
    targets = [{"a"}, {"a"}, {"a"}]
    assert M.recall_at_k(ranked, targets, 1) == pytest.approx(100 / 3)
    assert M.recall_at_k(ranked, targets, 2) == pytest.approx(200 / 3)
    assert M.recall_at_k(ranked, targets, 3) == 100.0
    assert M.recall_at_k([], [], 5) == 0.0
    # any relevant id counts
    assert M.recall_at_k([["x", "y"]], [{"y", "z"}], 2) == 100.0


def test_recall_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        M.recall_at_k([["a"]], [], 1)


def test_recall_subset_keeps_order_and_drops_excluded():
    # full ranking r, c, t, x; subset {r, t, x}, reference r excluded -> t first
    ranked = [["r", "c", "t", "x"]]
    assert M.recall_subset_at_k(ranked, [{"t"}], [{"r", "t", "x"}], 1, exclude=[{"r"}]) == 100.0
    assert M.recall_subset_at_k(ranked, [{"t"}], [{"r", "t", "x"}], 1) == 0.0
    assert M.recall_subset_at_k(ranked, [{"x"}], [{"r", "t", "x"}], 2, exclude=[{"r"}]) == 100.0


def test_average_precision_hand_computed():
    # hits at ranks 1 and 3 of 3 relevant: (1/1 + 2/3) / min(3, 5)
    assert M.average_precision_at_k(["a", "x", "b", "y", "z"], {"a", "b", "c"}, 5) == pytest.approx((1 + 2 / 3) / 3)
    # CIRCO divides by min(|G|, K): one relevant found at rank 2, K=1 -> 0; K=2 -> (1/2)/1
    assert M.average_precision_at_k(["x", "a"], {"a"}, 1) == 0.0
    assert M.average_precision_at_k(["x", "a"], {"a"}, 2) == pytest.approx(0.5)
    # more relevant than K: normaliser is K
    assert M.average_precision_at_k(["a", "b"], {"a", "b", "c", "d"}, 2) == pytest.approx(1.0)
    assert M.average_precision_at_k(["a"], set(), 5) == 0.0
    assert M.map_at_k([["a", "x"], ["x", "a"]], [{"a"}, {"a"}], 2) == pytest.approx(100 * (1 + 0.5) / 2)


def test_recall_from_ranks():
    assert M.recall_from_ranks([1, 2, 3, 10], 1) == 25.0
    assert M.recall_from_ranks([1, 2, 3, 10], 3) == 75.0
    assert M.recall_from_ranks([], 1) == 0.0


def _naive_recall(ranked, targets, k):
    return 100.0 * np.mean([1.0 if set(r[:k]) & set(t) else 0.0 for r, t in zip(ranked, targets, strict=True)])


def _official_circo_ap(predictions, gt, k):
    """The official CIRCO evaluation.py formula, in numpy."""
    labels = np.isin(np.array(predictions), np.array(gt))
    precisions = np.cumsum(labels, axis=0) * labels / np.arange(1, len(labels) + 1)
    return float(np.sum(precisions[:k]) / min(len(gt), k))


def test_metrics_match_naive_references_on_random_rankings():
    rng = random.Random(0)
    gallery = [f"g{i}" for i in range(60)]
    for _ in range(20):
        ranked, targets = [], []
        for _ in range(25):
            r = rng.sample(gallery, 50)
            t = rng.sample(gallery, rng.randint(1, 6))
            ranked.append(r)
            targets.append(t)
        for k in (1, 5, 10, 25, 50):
            assert M.recall_at_k(ranked, targets, k) == pytest.approx(_naive_recall(ranked, targets, k))
            expect = 100 * np.mean([_official_circo_ap(r, t, k) for r, t in zip(ranked, targets, strict=True)])
            assert M.map_at_k(ranked, targets, k) == pytest.approx(expect)
        subsets = [rng.sample(gallery, 6) for _ in ranked]
        excl = [s[:1] for s in subsets]
        full = [rng.sample(gallery, len(gallery)) for _ in ranked]
        tg = [[s[rng.randint(1, 5)]] for s in subsets]
        for k in (1, 2, 3):
            naive = [[x for x in r if x in s and x not in e] for r, s, e in zip(full, subsets, excl, strict=True)]
            assert M.recall_subset_at_k(full, tg, subsets, k, excl) == pytest.approx(_naive_recall(naive, tg, k))
