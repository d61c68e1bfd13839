"""FashionIQ (Wu et al., CVPR 2021) from the official ``captions/`` and ``image_splits/`` files.

Data root (``--data``)::

    captions/cap.{dress,shirt,toptee}.{val,test}.json     [{"target", "candidate", "captions": [c1, c2]}]
    image_splits/split.{dress,shirt,toptee}.{val,test}.json   [asin, ...]

Images (``--images``): ``<asin>.png`` (or ``.jpg``) in that folder or in its ``images/``.

Protocol: each category ranks its own gallery (that category's ``image_splits`` list;
the reference stays in it, as in the common CLIP4Cir/SEARLE protocol). R@10 and R@50
per category; the split-level R@10/R@50 are the mean over the three categories and
``avg`` is the mean of those two (the primary metric). The two captions are joined by
``caption_join``: ``and`` (default, "c1 and c2", each stripped of ``.?, `` like the
reference implementations), ``first`` or ``second``. Real records have an empty
caption; an empty part is dropped rather than producing "and c2". Test records have no
target: they are ranked for ``--submission`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cirkit.errors import CirkitError, RecordError
from cirkit.evaluate.base import Benchmark, Task, need, read_json
from cirkit.records import Query

CATEGORIES = ("dress", "shirt", "toptee")
CAPTION_JOINS = ("and", "first", "second")


def join_captions(captions: list[str], mode: str = "and") -> str:
    """The query text from a record's two captions (see module docstring)."""
    parts = [c.strip(".?, ") for c in captions]
    if mode == "first":
        parts = parts[:1]
    elif mode == "second":
        parts = parts[1:2]
    elif mode != "and":
        raise CirkitError(f"unknown caption join {mode!r}; choose one of {', '.join(CAPTION_JOINS)}")
    return " and ".join(p for p in parts if p)


class FashionIQ(Benchmark):
    """Adapter for the FashionIQ dress/shirt/toptee splits."""

    name = "fashioniq"
    default_split = "val"
    splits = ("val", "test")
    primary = "avg"

    def __init__(self, data: Path, images: Path | None = None, **options: Any):
        super().__init__(data, images, **options)
        self.caption_join = options.get("caption_join") or "and"
        if self.caption_join not in CAPTION_JOINS:
            raise CirkitError(f"unknown caption join {self.caption_join!r}; choose one of {', '.join(CAPTION_JOINS)}")
        self.exclude_reference = bool(options.get("exclude_reference") or False)

    def _image_dir(self) -> Path:
        root = self.image_root()
        return root / "images" if (root / "images").is_dir() else root

    def load(self, split: str) -> list[Task]:
        return [self.load_category(cat, split) for cat in CATEGORIES]

    def load_category(self, cat: str, split: str) -> Task:
        cap_path = self.data / "captions" / f"cap.{cat}.{split}.json"
        split_path = self.data / "image_splits" / f"split.{cat}.{split}.json"
        records = read_json(cap_path, f"FashionIQ {cat} captions")
        names = read_json(split_path, f"FashionIQ {cat} image split")
        if not isinstance(records, list):
            raise RecordError(cap_path, None, "expected a JSON list of records")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RecordError(split_path, None, "expected a JSON list of image names")
        image_dir = self._image_dir()
        gallery = {n: _image_path(image_dir, n) for n in names}
        queries = []
        for i, rec in enumerate(records):
            cand = need(rec, "candidate", str, cap_path, i)
            caps = need(rec, "captions", list, cap_path, i)
            if not all(isinstance(c, str) for c in caps):
                raise RecordError(cap_path, None, f"record {i}: captions must be strings", "captions")
            target = rec.get("target")
            if target is not None and target not in gallery:
                raise RecordError(cap_path, None, f"record {i}: target {target!r} is not in {split_path.name}", "target")
            text = join_captions(caps, self.caption_join)
            queries.append(Query(
                id=f"{cat}-{i}", reference=str(_image_path(image_dir, cand)), reference_id=cand,
                text=text or None, targets=[target] if target else [],
            ))
        return Task(
            name=cat, gallery=gallery, queries=queries,
            has_ground_truth=any(q.targets for q in queries),
            exclude_reference=self.exclude_reference, recall_ks=(10, 50),
            details={"captions": str(cap_path), "image_split": str(split_path)},
        )

    def aggregate(self, split: str, per_task: dict[str, dict[str, float]]) -> dict[str, float]:
        out = {}
        for k in ("R@10", "R@50"):
            vals = [d[k] for d in per_task.values() if k in d]
            if vals:
                out[k] = sum(vals) / len(vals)
        if "R@10" in out and "R@50" in out:
            out["avg"] = (out["R@10"] + out["R@50"]) / 2
        return out

    def protocol(self) -> dict[str, Any]:
        return {"caption_join": self.caption_join, "exclude_reference": self.exclude_reference,
                "categories": ",".join(CATEGORIES)}


def _image_path(folder: Path, name: str) -> Path:
    png = folder / f"{name}.png"
    if png.exists():
        return png
    jpg = folder / f"{name}.jpg"
    return jpg if jpg.exists() else png
