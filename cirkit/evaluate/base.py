"""The common shape every benchmark adapter produces, so one evaluator serves them all.

An adapter reads a benchmark's annotation files exactly as published and returns
:class:`Task` objects: a gallery ``{id: image path}``, a list of
:class:`cirkit.records.Query`, and which metrics that task reports. The evaluator
(:mod:`cirkit.evaluate`) embeds each gallery image once, ranks exactly, and scores each
task with the pure functions in :mod:`cirkit.metrics`; the adapter then combines the
per-task numbers into the benchmark's own summary (``aggregate``) and writes test-server
files (``write_submission``).

Protocol rules shared by all adapters:

- Global galleries are ranked by :func:`cirkit.retrieval.topk`: ties go to the gallery
  item listed first (the annotation file's order).
- Per-query galleries (``Query.candidates``, GeneCIS) use the pessimistic rank: every
  other candidate with a score >= the target's counts against it, so a model that gives
  every image the same score gets R@1 = 0, not 100. Repeated candidate ids are scored
  once (a copy of the target listed again in its own gallery is the same image).
- ``Query.subset`` (CIRR) ranks only that group, minus the excluded reference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cirkit.errors import CirkitError, RecordError
from cirkit.records import Query


@dataclass
class Task:
    """One ranked evaluation unit (a FashionIQ category, a GeneCIS task, a CIRR split)."""

    name: str
    gallery: dict[str, Path]
    queries: list[Query]
    has_ground_truth: bool = True
    exclude_reference: bool = False
    recall_ks: tuple[int, ...] = (1, 5, 10, 50)
    recall_first_target_only: bool = False
    map_ks: tuple[int, ...] = ()
    subset_ks: tuple[int, ...] = ()
    candidate_ks: tuple[int, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def per_query_gallery(self) -> bool:
        return any(q.candidates is not None for q in self.queries)

    def depth(self) -> int:
        """How many global hits each query needs for these metrics."""
        return max((*self.recall_ks, *self.map_ks, 1))


@dataclass
class Ranked:
    """What the evaluator hands back for one task and one mode."""

    ids: dict[str, list[str]]
    scores: dict[str, list[float]]
    subset: dict[str, list[str]] = field(default_factory=dict)
    target_ranks: dict[str, int] = field(default_factory=dict)


class Benchmark:
    """Base adapter: subclasses set ``name``/``splits`` and implement ``load``."""

    name = "benchmark"
    default_split = "val"
    splits: tuple[str, ...] = ()
    primary = "R@1"

    def __init__(self, data: Path, images: Path | None = None, **options: Any):
        self.data = Path(data)
        self.images = Path(images) if images is not None else None
        self.options = options
        if not self.data.exists():
            raise CirkitError(f"{self.data}: no such folder; --data must point at the {self.name} annotations")

    # -- reading -------------------------------------------------------------------------
    def load(self, split: str) -> list[Task]:
        raise NotImplementedError

    def default_splits(self) -> list[str]:
        return [self.default_split]

    def image_root(self) -> Path:
        root = self.images if self.images is not None else self.data
        if not root.is_dir():
            raise CirkitError(f"{root}: no such folder; --images must point at the {self.name} images")
        return root

    # -- scoring -------------------------------------------------------------------------
    def aggregate(self, split: str, per_task: dict[str, dict[str, float]]) -> dict[str, float]:
        """Split-level numbers from per-task metrics (default: the one task's own metrics)."""
        if len(per_task) == 1:
            return dict(next(iter(per_task.values())))
        names = sorted({m for d in per_task.values() for m in d})
        return {m: _mean([d[m] for d in per_task.values() if m in d]) for m in names}

    def primary_metric(self, split: str) -> str:
        """The split-level metric key (without mode/split prefix) that sums up a run."""
        return self.primary

    def protocol(self) -> dict[str, Any]:
        """The switches that change the numbers; recorded in metrics.json."""
        return {}

    # -- outputs -------------------------------------------------------------------------
    def write_submission(self, split: str, task: Task, ranked: Ranked, folder: Path) -> list[Path]:
        """Write this task's rankings; default: ``<benchmark>-<split>[-<task>]-rankings.jsonl`` of Result records.

        Image paths are written absolute, as ``query --batch`` writes ``results.jsonl``: a path
        relative to where the command ran would point elsewhere from the rankings file's folder.
        """
        from cirkit.io import safe_join, write_jsonl
        from cirkit.records import Result

        stem = f"{self.name}-{split}" if task.name == split else f"{self.name}-{split}-{task.name}"
        # name and split can come from a user's meta.json: never write outside the folder
        path = safe_join(folder, f"{stem}-rankings.jsonl")
        recs = []
        for q in task.queries:
            if q.id not in ranked.ids:
                continue
            hits = [
                {"rank": r, "id": g, "score": round(float(s), 6), "image": str(Path(task.gallery[g]).resolve())}
                for r, (g, s) in enumerate(zip(ranked.ids[q.id], ranked.scores[q.id], strict=True), start=1)
            ]
            ref = str(Path(q.reference).resolve()) if q.reference else None
            recs.append(Result(id=q.id, hits=hits, reference=ref, text=q.text))
        write_jsonl(path, recs, kind="rankings file", owned=is_rankings)
        return [path]


def is_rankings(path: Path) -> bool:
    """Whether ``path`` is a rankings JSONL cirkit wrote (its first line a result with ``hits``)."""
    from cirkit.io.atomic import read_head

    first = read_head(path, 1 << 20).split(b"\n", 1)[0]
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and "id" in obj and isinstance(obj.get("hits"), list)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def read_json(path: Path, what: str) -> Any:
    """Load an annotation JSON file with a one-line error naming the file."""
    if not path.exists():
        raise CirkitError(f"{path}: no such file ({what})")
    try:
        from cirkit.io.jsonl import loads

        return loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecordError(path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError:
        raise RecordError(path, None, "not valid UTF-8") from None


def need(rec: Any, key: str, types: type | tuple[type, ...], path: Path, index: int) -> Any:
    """``rec[key]`` checked for type, else a RecordError naming file, record and field."""
    if not isinstance(rec, dict):
        raise RecordError(path, None, f"record {index}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec:
        raise RecordError(path, None, f"record {index}: missing", key)
    value = rec[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise RecordError(path, None, f"record {index}: unexpected {type(value).__name__} {value!r:.60}", key)
    return value


def first_existing(*candidates: Path) -> Path | None:
    for c in candidates:
        if c.exists():
            return c
    return None
