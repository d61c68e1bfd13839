"""The generic benchmark format, so users evaluate on their own data.

A folder with::

    gallery.jsonl   {"id": "g1", "image": "images/g1.png"}              (GalleryItem)
    queries.jsonl   {"id": "q1", "reference": "images/r1.png", "text": "make it red",
                     "targets": ["g1"], "reference_id": "r1"}          (Query)
    meta.json       optional: {"name": "...", "split": "test", "exclude_reference": false,
                               "recall_ks": [1, 5, 10, 50]}

Image paths resolve relative to the JSONL file's folder.

Either file may instead be a Hugging Face dataset with the same columns
(:mod:`cirkit.io.datasets`): ``gallery.parquet``/``queries.parquet``, ``.arrow``, webdataset
shards ``gallery*.tar``/``queries*.tar`` (a ``.json`` member per sample holds the query fields;
its image member is the reference), or ``save_to_disk`` folders ``gallery/`` and ``queries/``.
Images may then be Image columns (bytes) or paths relative to the dataset's folder. A query's reference is removed
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
    gdata, qdata = (dataset_input(folder, "gallery") if not gpath.exists() else None,
                    dataset_input(folder, "queries") if not qpath.exists() else None)
    for p, d in ((gpath, gdata), (qpath, qdata)):
        if not p.exists() and d is None:
            raise CirkitError(f"{p}: missing; a generic benchmark folder needs gallery.jsonl and queries.jsonl "
                              f"(or datasets named gallery and queries)")
    gallery: dict[str, Any] = {}
    by_path: dict[Path, str] = {}
    if gdata is not None:
        from cirkit.io.datasets import image_items

        gallery.update(image_items(gdata))
        gpath = Path(gdata)
    else:
        for item in read_records(gpath, GalleryItem):
            gallery[item.id] = resolve_path(item.image, gpath.parent)
    for gid, p in gallery.items():
        if isinstance(p, Path):
            by_path.setdefault(p.resolve(), gid)
    queries = []
    records = _dataset_queries(qdata) if qdata is not None else enumerate(read_records(qpath, Query), start=1)
    qpath = Path(qdata) if qdata is not None else qpath
    for lineno, q in records:
        for fieldname in ("targets", "candidates", "subset"):
            for gid in getattr(q, fieldname) or []:
                if gid not in gallery:
                    raise RecordError(qpath, lineno, f"gallery id {gid!r} is not in {gpath.name}", fieldname)
        if q.reference is not None and isinstance(q.reference, str):
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


DATASET_SUFFIXES = (".parquet", ".arrow")


def dataset_input(folder: Path, name: str) -> str | None:
    """The dataset that holds a generic benchmark's ``name`` (gallery or queries), or None."""
    from cirkit.io.datasets import is_dataset

    for suffix in DATASET_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return str(folder / f"{name}{suffix}")
    if (folder / name).is_dir() and is_dataset(folder / name):
        return str(folder / name)
    shards = sorted(folder.glob(f"{name}*.tar"))
    if shards:
        return str(folder / f"{name}*.tar")
    return None


def _dataset_queries(source: str):
    """``(row number, Query)`` of a queries dataset; a reference image column gives a dataset image."""
    from cirkit.io.datasets import IMAGE_COLUMNS, DatasetOptions, image_cell, open_rows, raw_rows

    rows = open_rows(source, DatasetOptions(), image=False)
    cols = list(rows.ds.column_names)
    image_col = "reference" if "reference" in cols else next((c for c in IMAGE_COLUMNS if c in cols), None)
    fields = {f for f in Query.__dataclass_fields__ if f != "extra"}
    cells: dict[str, Any] = {}
    for n, row in enumerate(raw_rows(rows)):
        obj = dict(row.get("json") or {}) if isinstance(row.get("json"), dict) else {}  # webdataset: sample.json
        obj.update({k: v for k, v in row.items() if k in fields and v is not None})
        if "id" not in obj:
            obj["id"] = str(row[rows.id]) if rows.id else str(n)
        image = row.get(image_col) if image_col else None
        obj.pop("reference", None)
        if image is not None:
            obj["reference"] = rows.label(str(obj["id"]))  # replaced by the image itself once checked
        q = Query.from_dict(obj, source, n + 1)
        if image is not None:
            q.reference = image_cell(row, image_col, rows, str(obj["id"]), cells, n)
        yield n + 1, q


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
