"""Retrieval metrics as pure functions over ranked id lists (percentages, 0-100).

``ranked`` is one list of gallery ids per query, best first; ``targets`` is one
collection of relevant ids per query. Every function here is tested on hand-computed
cases and against a naive reference in ``tests/test_metrics.py``.

Each metric is the mean of a per-query score (``*_scores``: 0 or 100 for a recall, AP x 100
for CIRCO), so :func:`bootstrap_ci` can resample queries and recompute any benchmark summary
(FashionIQ's mean over categories, CIRR's (R@5 + Rs@1) / 2) from the same resampled queries.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence


def _check(ranked: Sequence, other: Sequence) -> None:
    if len(ranked) != len(other):
        raise ValueError(f"{len(ranked)} rankings but {len(other)} target lists")


def recall_scores(ranked: Sequence[Sequence], targets: Sequence[Collection], k: int) -> list[float]:
    """Per query: 100 if a relevant id is in its top ``k``, else 0."""
    _check(ranked, targets)
    return [100.0 if any(x in t for x in r[:k]) else 0.0 for r, t in zip(ranked, targets, strict=True)]


def recall_at_k(ranked: Sequence[Sequence], targets: Sequence[Collection], k: int) -> float:
    """Share of queries with at least one relevant id in the top ``k`` (x100)."""
    return mean(recall_scores(ranked, targets, k))


def recall_subset_scores(
    ranked: Sequence[Sequence], targets: Sequence[Collection], subsets: Sequence[Collection], k: int,
    exclude: Sequence[Collection] | None = None,
) -> list[float]:
    """Per query: :func:`recall_subset_at_k`'s 100 or 0."""
    _check(ranked, subsets)
    filtered = []
    for i, (r, s) in enumerate(zip(ranked, subsets, strict=True)):
        s = set(s) - set(exclude[i] if exclude is not None else ())
        filtered.append([x for x in r if x in s])
    return recall_scores(filtered, targets, k)


def recall_subset_at_k(
    ranked: Sequence[Sequence], targets: Sequence[Collection], subsets: Sequence[Collection], k: int,
    exclude: Sequence[Collection] | None = None,
) -> float:
    """CIRR Recall_subset@k: recall after keeping only each query's subset (minus ``exclude``).

    ``ranked`` must rank the whole subset (a full ranking filtered here keeps its order).
    """
    return mean(recall_subset_scores(ranked, targets, subsets, k, exclude))


def average_precision_at_k(ranked: Sequence, relevant: Collection, k: int) -> float:
    """CIRCO AP@k: sum of precision@i at each relevant hit i <= k, over min(|relevant|, k)."""
    relevant = set(relevant)
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    seen: set = set()
    for i, x in enumerate(ranked[:k], start=1):
        if x in relevant and x not in seen:
            hits += 1
            total += hits / i
        seen.add(x)
    return total / min(len(relevant), k)


def ap_scores(ranked: Sequence[Sequence], targets: Sequence[Collection], k: int) -> list[float]:
    """Per query: AP@k x 100 (several relevant ids per query, CIRCO)."""
    _check(ranked, targets)
    return [100.0 * average_precision_at_k(r, t, k) for r, t in zip(ranked, targets, strict=True)]


def map_at_k(ranked: Sequence[Sequence], targets: Sequence[Collection], k: int) -> float:
    """Mean AP@k over queries (x100)."""
    return mean(ap_scores(ranked, targets, k))


def rank_scores(ranks: Sequence[int], k: int) -> list[float]:
    """Per query: 100 if its 1-based target rank is <= k, else 0."""
    return [100.0 if r <= k else 0.0 for r in ranks]


def recall_from_ranks(ranks: Sequence[int], k: int) -> float:
    """Share of 1-based target ranks <= k (x100); for per-query galleries (GeneCIS)."""
    return mean(rank_scores(ranks, k))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# -- confidence intervals -----------------------------------------------------------------------
Scores = Mapping[str, Mapping[str, Sequence[float]]]  # task -> metric -> one score per query


def mean_of_tasks(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The default summary: a single task's metrics, or each metric's mean over the tasks."""
    names = list(dict.fromkeys(m for d in per_task.values() for m in d))
    return {m: mean([d[m] for d in per_task.values() if m in d]) for m in names}


def bootstrap_ci(
    scores: Scores, summarize: Callable[[dict[str, dict[str, float]]], Mapping[str, float]] = mean_of_tasks,
    samples: int = 1000, seed: int = 0, level: float = 0.95,
) -> tuple[dict[str, tuple[float, float]], dict[str, dict[str, tuple[float, float]]]]:
    """Percentile-bootstrap confidence intervals: ``(summary metric -> (lo, hi), task -> metric -> (lo, hi))``.

    Each of ``samples`` replicates draws every task's queries with replacement (as many as it
    has; the tasks' sizes stay fixed, like the benchmark's), takes each metric's mean over the
    drawn queries (the same draw for all of a task's metrics, so a summary that combines
    metrics stays paired), and passes the per-task means to ``summarize`` (a benchmark's own
    aggregate). The interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of
    the replicates (linear interpolation, numpy's default). Seeded: the same inputs and seed
    give the same intervals. Draw order: replicate by replicate, tasks in ``scores`` order,
    ``numpy.random.default_rng(seed).integers(0, n, n)`` per task.
    """
    import numpy as np

    tasks = {t: {m: np.asarray(v, dtype=np.float64) for m, v in ms.items()} for t, ms in scores.items()}
    tasks = {t: ms for t, ms in tasks.items() if ms and len(next(iter(ms.values())))}
    if samples < 1 or not tasks:
        return {}, {}
    rng = np.random.default_rng(seed)
    summary_reps: dict[str, list[float]] = {}
    task_reps: dict[str, dict[str, list[float]]] = {t: {m: [] for m in ms} for t, ms in tasks.items()}
    for _ in range(samples):
        rep = {}
        for t, ms in tasks.items():
            n = len(next(iter(ms.values())))
            idx = rng.integers(0, n, n)
            rep[t] = {m: float(v[idx].mean()) for m, v in ms.items()}
            for m, value in rep[t].items():
                task_reps[t][m].append(value)
        for m, value in summarize(rep).items():
            summary_reps.setdefault(m, []).append(float(value))
    q = [(1 - level) / 2, (1 + level) / 2]

    def interval(values: list[float]) -> tuple[float, float]:
        lo, hi = np.quantile(np.asarray(values), q)
        return float(lo), float(hi)

    return ({m: interval(v) for m, v in summary_reps.items()},
            {t: {m: interval(v) for m, v in ms.items()} for t, ms in task_reps.items()})
