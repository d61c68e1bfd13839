"""The generic benchmark format, so users evaluate on their own data.

A folder with::

    gallery.jsonl   {"id": "g1", "image": "images/g1.png"}              (GalleryItem)
    queries.jsonl   {"id": "q1", "reference": "images/r1.png", "text": "make it red",
                     "targets": ["g1"], "reference_id": "r1"}          (Query)
    meta.json       optional: {"name": "...", "split": "test", "exclude_reference": false,
                               "recall_ks": [1, 5, 10, 50]}

Image paths resolve relative to the JSONL file's folder. A query's reference is removed
from its ranking when ``exclude_reference`` is true (matched by ``reference_id``, else by
image path). Optional query fields: ``candidates`` (rank only these gallery ids, GeneCIS
style, R@1/2/3 with pessimistic ties), ``subset`` (CIRR-style Recall_subset@1/2/3).
Queries with several targets also get mAP@5/10/25/50. Queries with no targets are
ranked (for ``--submission``) but not scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cirkit.errors import CirkitError, RecordError
from cirkit.evaluate.base import Benchmark, Task, read_json
from cirkit.io import read_records
from cirkit.records import GalleryItem, Query, resolve_path


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    if not path.exists():
        return {}
    meta = read_json(path, "benchmark metadata")
    if not isinstance(meta, dict):
        raise RecordError(path, None, "meta.json must be a JSON object")
    return meta


def load_generic_task(folder: Path, name: str, meta: dict[str, Any] | None = None,
                      exclude_reference: bool | None = None) -> Task:
    """Read one generic-format folder into a :class:`Task`."""
    meta = read_meta(folder) if meta is None else meta
    gpath, qpath = folder / "gallery.jsonl", folder / "queries.jsonl"
    for p in (gpath, qpath):
        if not p.exists():
            raise CirkitError(f"{p}: missing; a generic benchmark folder needs gallery.jsonl and queries.jsonl")
    gallery: dict[str, Path] = {}
    by_path: dict[Path, str] = {}
    for item in read_records(gpath, GalleryItem):
        p = resolve_path(item.image, gpath.parent)
        gallery[item.id] = p
        by_path.setdefault(p.resolve(), item.id)
    queries = []
    for lineno, q in enumerate(read_records(qpath, Query), start=1):
        for fieldname in ("targets", "candidates", "subset"):
            for gid in getattr(q, fieldname) or []:
                if gid not in gallery:
                    raise RecordError(qpath, lineno, f"gallery id {gid!r} is not in {gpath.name}", fieldname)
        if q.reference is not None:
            ref = resolve_path(q.reference, qpath.parent)
            q.reference = str(ref)
            if q.reference_id is None:
                q.reference_id = by_path.get(ref.resolve())
        queries.append(q)
    with_cands = sum(q.candidates is not None for q in queries)
    if 0 < with_cands < len(queries):
        raise CirkitError(f"{qpath}: give 'candidates' for every query or for none ({with_cands} of {len(queries)} have them)")
    excl = meta.get("exclude_reference", False) if exclude_reference is None else exclude_reference
    ks = () if with_cands else tuple(int(k) for k in meta.get("recall_ks", (1, 5, 10, 50)))
    return Task(
        name=name,
        gallery=gallery,
        queries=queries,
        has_ground_truth=any(q.targets for q in queries),
        exclude_reference=bool(excl),
        recall_ks=ks,
        map_ks=(5, 10, 25, 50) if not with_cands and any(len(q.targets) > 1 for q in queries) else (),
        subset_ks=(1, 2, 3) if any(q.subset for q in queries) else (),
        candidate_ks=(1, 2, 3) if with_cands else (),
        details={"folder": str(folder)},
    )


class GenericBenchmark(Benchmark):
    """A single generic-format folder; its one split is named by meta.json ``split`` (default ``test``)."""

    name = "generic"
    default_split = "test"

    def __init__(self, data: Path, images: Path | None = None, **options: Any):
        super().__init__(data, images, **options)
        self.meta = read_meta(self.data)
        self.name = str(self.meta.get("name", "generic"))
        self.default_split = str(self.meta.get("split", "test"))
        self.splits = (self.default_split,)

    def load(self, split: str) -> list[Task]:
        if split != self.default_split:
            raise CirkitError(f"{self.data}: this benchmark has one split, {self.default_split!r}, not {split!r}")
        return [load_generic_task(self.data, split, self.meta, self.options.get("exclude_reference"))]

    def primary_metric(self, split: str) -> str:
        return "R@1"

    def protocol(self) -> dict[str, Any]:
        excl = self.options.get("exclude_reference")
        return {"exclude_reference": bool(self.meta.get("exclude_reference", False) if excl is None else excl)}
