"""Retrieval metrics as pure functions over ranked id lists (percentages, 0-100).

``ranked`` is one list of gallery ids per query, best first; ``targets`` is one
collection of relevant ids per query. Every function here is tested on hand-computed
cases and against a naive reference in ``tests/test_metrics.py``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


def _check(ranked: Sequence, other: Sequence) -> None:
    if len(ranked) != len(other):
        raise ValueError(f"{len(ranked)} rankings but {len(other)} target lists")


def recall_at_k(ranked: Sequence[Sequence], targets: Sequence[Collection], k: int) -> float:
    """Share of queries with at least one relevant id in the top ``k`` (x100)."""
    _check(ranked, targets)
    if not ranked:
        return 0.0
    hits = sum(1 for r, t in zip(ranked, targets, strict=True) if any(x in t for x in r[:k]))
    return 100.0 * hits / len(ranked)


def recall_subset_at_k(
    ranked: Sequence[Sequence], targets: Sequence[Collection], subsets: Sequence[Collection], k: int,
    exclude: Sequence[Collection] | None = None,
) -> float:
    """CIRR Recall_subset@k: recall after keeping only each query's subset (minus ``exclude``).

    ``ranked`` must rank the whole subset (a full ranking filtered here keeps its order).
    """
    _check(ranked, subsets)
    filtered = []
    for i, (r, s) in enumerate(zip(ranked, subsets, strict=True)):
        s = set(s) - set(exclude[i] if exclude is not None else ())
        filtered.append([x for x in r if x in s])
    return recall_at_k(filtered, targets, k)


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


def map_at_k(ranked: Sequence[Sequence], targets: Sequence[Collection], k: int) -> float:
    """Mean AP@k over queries (x100)."""
    _check(ranked, targets)
    if not ranked:
        return 0.0
    return 100.0 * sum(average_precision_at_k(r, t, k) for r, t in zip(ranked, targets, strict=True)) / len(ranked)


def recall_from_ranks(ranks: Sequence[int], k: int) -> float:
    """Share of 1-based target ranks <= k (x100); for per-query galleries (GeneCIS)."""
    if not ranks:
        return 0.0
    return 100.0 * sum(1 for r in ranks if r <= k) / len(ranks)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
