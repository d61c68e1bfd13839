"""CIRR (Liu et al., ICCV 2021) from the official ``cirr/`` annotation folder (release rc2).

Data root (``--data``)::

    captions/cap.rc2.{train,val,test1}.json       [{"pairid", "reference", "target_hard",
                                                    "target_soft", "caption", "img_set": {"id", "members"}}]
    image_splits/split.rc2.{train,val,test1}.json {name: "./dev/<name>.png", ...}

Images (``--images``): the NLVR2 image root; each image is ``<images>/<path from image_splits>``.

Protocol (as the official evaluation server and CLIP4Cir): the gallery is every image of
the split, and each query's reference is removed from its own ranking. R@1/5/10/50 on
``target_hard`` (``target_soft`` is not used; pairid 12130's ``target_hard`` is missing
from its ``target_soft`` and still counts). Recall_subset@1/2/3 ranks only the query's
``img_set.members`` minus the reference. ``avg`` = (R@5 + Recall_subset@1) / 2 is the
primary metric. ``test1`` has no targets: it is ranked for the test-server files
(``--submission``): ``recall`` (top 50) and ``recall_subset`` (top 3).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cirkit.errors import CirkitError, RecordError
from cirkit.evaluate.base import Benchmark, Ranked, Task, need, read_json
from cirkit.records import Query


class CIRR(Benchmark):
    """Adapter for the CIRR val/test1 splits."""

    name = "cirr"
    default_split = "val"
    splits = ("val", "test1", "train")
    primary = "avg"

    def __init__(self, data: Path, images: Path | None = None, **options: Any):
        super().__init__(data, images, **options)
        if not (self.data / "captions").is_dir() and (self.data / "cirr" / "captions").is_dir():
            self.data = self.data / "cirr"
        excl = options.get("exclude_reference")
        self.exclude_reference = True if excl is None else bool(excl)
        self.version = "rc2"

    def _files(self, split: str) -> tuple[Path, Path]:
        split = "test1" if split == "test" else split
        caps = sorted((self.data / "captions").glob(f"cap.*.{split}.json"))
        if not caps:
            raise CirkitError(f"{self.data / 'captions'}: no cap.<version>.{split}.json; is --data the CIRR annotation root?")
        cap = caps[-1]
        m = re.match(r"cap\.(.+)\.[^.]+\.json$", cap.name)
        self.version = m.group(1) if m else "rc2"
        return cap, self.data / "image_splits" / f"split.{self.version}.{split}.json"

    def load(self, split: str) -> list[Task]:
        split = "test1" if split == "test" else split
        cap_path, split_path = self._files(split)
        records = read_json(cap_path, "CIRR captions")
        names = read_json(split_path, "CIRR image split")
        if not isinstance(records, list):
            raise RecordError(cap_path, None, "expected a JSON list of records")
        if not isinstance(names, dict):
            raise RecordError(split_path, None, "expected a JSON object {image name: relative path}")
        root = self.image_root()
        gallery = {n: root / p for n, p in names.items()}
        queries = []
        for i, rec in enumerate(records):
            pairid = need(rec, "pairid", int, cap_path, i)
            ref = need(rec, "reference", str, cap_path, i)
            caption = need(rec, "caption", str, cap_path, i)
            img_set = need(rec, "img_set", dict, cap_path, i)
            members = img_set.get("members")
            if not isinstance(members, list):
                raise RecordError(cap_path, None, f"record {i} (pairid {pairid}): img_set.members must be a list", "img_set")
            target = rec.get("target_hard")
            for name in [ref, *members, *([target] if target else [])]:
                if name not in gallery:
                    raise RecordError(cap_path, None, f"record {i} (pairid {pairid}): image {name!r} is not in {split_path.name}")
            queries.append(Query(
                id=str(pairid), reference=str(gallery[ref]), reference_id=ref, text=caption,
                targets=[target] if target else [], subset=list(members),
                extra={"img_set_id": img_set.get("id")},
            ))
        return [Task(
            name=split, gallery=gallery, queries=queries,
            has_ground_truth=any(q.targets for q in queries),
            exclude_reference=self.exclude_reference,
            recall_ks=(1, 5, 10, 50), subset_ks=(1, 2, 3),
            details={"captions": str(cap_path), "image_split": str(split_path)},
        )]

    def caption_extensions(self, split: str) -> dict[str, dict[str, str]]:
        """``captions_ext/cap.ext.<version>.<split>.json`` as {pairid: caption_extend}; not used for scoring."""
        split = "test1" if split == "test" else split
        self._files(split)
        path = self.data / "captions_ext" / f"cap.ext.{self.version}.{split}.json"
        records = read_json(path, "CIRR caption extensions")
        if not isinstance(records, list):
            raise RecordError(path, None, "expected a JSON list of records")
        out = {}
        for i, rec in enumerate(records):
            pairid = need(rec, "pairid", int, path, i)
            ext = need(rec, "caption_extend", dict, path, i)
            out[str(pairid)] = {str(k): str(v) for k, v in ext.items()}
        return out

    def aggregate(self, split: str, per_task: dict[str, dict[str, float]]) -> dict[str, float]:
        out = dict(next(iter(per_task.values())))
        if "R@5" in out and "Rs@1" in out:
            out["avg"] = (out["R@5"] + out["Rs@1"]) / 2
        return out

    def protocol(self) -> dict[str, Any]:
        return {"exclude_reference": self.exclude_reference, "version": self.version, "target": "target_hard"}

    def write_submission(self, split: str, task: Task, ranked: Ranked, folder: Path) -> list[Path]:
        from cirkit.evaluate.submission import write_cirr_submission

        split = "test1" if split == "test" else split
        return write_cirr_submission(folder, split, ranked.ids, ranked.subset, version=self.version)
