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


# -- per-query scores and the bootstrap (issue 15: claims above noise) ---------------------------
def test_each_metric_is_the_mean_of_its_per_query_scores():
    rng = random.Random(1)
    gallery = [f"g{i}" for i in range(30)]
    ranked = [rng.sample(gallery, 20) for _ in range(15)]
    targets = [rng.sample(gallery, rng.randint(1, 4)) for _ in ranked]
    for k in (1, 5, 10):
        assert M.mean(M.recall_scores(ranked, targets, k)) == M.recall_at_k(ranked, targets, k)
        assert M.mean(M.ap_scores(ranked, targets, k)) == M.map_at_k(ranked, targets, k)
        assert set(M.recall_scores(ranked, targets, k)) <= {0.0, 100.0}
    assert M.rank_scores([1, 3, 7], 3) == [100.0, 100.0, 0.0]
    assert M.recall_subset_scores([["r", "c", "t"]], [{"t"}], [{"r", "t"}], 1, [{"r"}]) == [100.0]


def _naive_bootstrap(scores, summarize, samples, seed, level):
    """Loops over the same draws (numpy's default_rng, replicate by replicate, task by task)."""
    rng = np.random.default_rng(seed)
    reps, task_reps = {}, {}
    for _ in range(samples):
        rep = {}
        for t, ms in scores.items():
            n = len(next(iter(ms.values())))
            idx = [int(i) for i in rng.integers(0, n, n)]
            rep[t] = {m: sum(v[i] for i in idx) / n for m, v in ms.items()}
            for m, x in rep[t].items():
                task_reps.setdefault(t, {}).setdefault(m, []).append(x)
        for m, x in summarize(rep).items():
            reps.setdefault(m, []).append(x)

    def quantile(values, q):  # linear interpolation between order statistics
        xs = sorted(values)
        pos = q * (len(xs) - 1)
        lo = int(pos)
        return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)

    def interval(values):
        return quantile(values, (1 - level) / 2), quantile(values, (1 + level) / 2)

    return ({m: interval(v) for m, v in reps.items()},
            {t: {m: interval(v) for m, v in ms.items()} for t, ms in task_reps.items()})


def _fiq_like(per_task):
    """A summary combining tasks and metrics, as FashionIQ's average of R@10 and R@50 over categories."""
    out = {k: M.mean([d[k] for d in per_task.values()]) for k in ("R@10", "R@50")}
    out["avg"] = (out["R@10"] + out["R@50"]) / 2
    return out


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_bootstrap_ci_matches_a_naive_implementation(level):
    rng = random.Random(2)
    scores = {}
    for task, n in (("dress", 23), ("shirt", 17), ("toptee", 5)):
        r10 = [100.0 * (rng.random() < 0.4) for _ in range(n)]
        scores[task] = {"R@10": r10, "R@50": [max(x, 100.0 * (rng.random() < 0.5)) for x in r10]}
    got = M.bootstrap_ci(scores, _fiq_like, samples=300, seed=7, level=level)
    want = _naive_bootstrap(scores, _fiq_like, 300, 7, level)
    for g, w in ((got[0], want[0]), *((got[1][t], want[1][t]) for t in scores)):
        assert g.keys() == w.keys()
        for m in g:
            assert g[m] == pytest.approx(w[m], abs=1e-9), m


def test_bootstrap_ci_is_seeded_contains_the_estimate_and_shrinks_with_more_queries():
    rng = random.Random(3)
    small = {"t": {"R@1": [100.0 * (rng.random() < 0.3) for _ in range(100)]}}
    big = {"t": {"R@1": [100.0 * (rng.random() < 0.3) for _ in range(1600)]}}
    a, b = M.bootstrap_ci(small, seed=1)[0]["R@1"], M.bootstrap_ci(small, seed=1)[0]["R@1"]
    assert a == b and a != M.bootstrap_ci(small, seed=2)[0]["R@1"]
    p = M.mean(small["t"]["R@1"])
    assert a[0] <= p <= a[1]
    # close to the normal approximation p +- 1.96 sqrt(p (100 - p) / n) of a proportion
    half = 1.96 * (p * (100 - p) / 100) ** 0.5
    assert (a[1] - a[0]) / 2 == pytest.approx(half, rel=0.15)
    wide, narrow = a[1] - a[0], (lambda c: c[1] - c[0])(M.bootstrap_ci(big, seed=1)[0]["R@1"])
    assert narrow == pytest.approx(wide / 4, rel=0.25)  # 16x the queries: a quarter of the width


def test_bootstrap_ci_edge_cases():
    assert M.bootstrap_ci({"t": {"R@1": [100.0] * 9}})[0]["R@1"] == (100.0, 100.0)  # no spread, no width
    assert M.bootstrap_ci({"t": {"R@1": [1.0, 0.0]}}, samples=0) == ({}, {})
    assert M.bootstrap_ci({"t": {"R@1": []}}) == ({}, {})
    # several targets per query (CIRCO): the interval is over queries' APs, not over targets
    ap = M.ap_scores([["a", "x", "b"], ["x", "y", "z"]], [{"a", "b"}, {"z", "q", "r"}], 3)
    lo, hi = M.bootstrap_ci({"circo": {"mAP@3": ap}}, samples=200)[0]["mAP@3"]
    assert min(ap) <= lo <= M.mean(ap) <= hi <= max(ap)
