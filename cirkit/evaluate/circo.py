"""CIRCO (Baldrati et al., ICCV 2023) from the official ``annotations/{val,test}.json``.

Data root (``--data``): the CIRCO repository folder (with ``annotations/``) or the
``annotations`` folder itself. Records: ``id``, ``reference_img_id``,
``relative_caption``, ``shared_concept`` and, for val, ``target_img_id`` and
``gt_img_ids``.

Images (``--images``): the COCO 2017 unlabeled images, ``{id:012d}.jpg``, in that folder
or in its ``unlabeled2017/`` or ``COCO2017_unlabeled/unlabeled2017/``. The gallery is
every ``.jpg`` there with a numeric name (123,403 images in the full set); ids are the
integers as strings.

Protocol (as the official ``evaluation.py``): mAP@5/10/25/50 over all ``gt_img_ids``,
AP@K divided by min(|gt|, K); Recall@5/10/25/50 on ``target_img_id`` only. The primary
metric is mAP@10. The reference stays in the gallery (the official scorer does not
remove it; ``exclude_reference`` is a recorded switch). ``test`` is ranked for the
evaluation-server file (``--submission``): ``{"<query id>": [50 int image ids]}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cirkit.errors import CirkitError, RecordError
from cirkit.evaluate.base import Benchmark, Ranked, Task, first_existing, need, read_json
from cirkit.records import Query

KS = (5, 10, 25, 50)


def coco_file(image_id: int) -> str:
    return f"{int(image_id):012d}.jpg"


class CIRCO(Benchmark):
    """Adapter for the CIRCO val/test splits."""

    name = "circo"
    default_split = "val"
    splits = ("val", "test")
    primary = "mAP@10"

    def __init__(self, data: Path, images: Path | None = None, **options: Any):
        super().__init__(data, images, **options)
        self.exclude_reference = bool(options.get("exclude_reference") or False)

    def _annotations(self, split: str) -> Path:
        found = first_existing(self.data / "annotations" / f"{split}.json", self.data / f"{split}.json")
        if found is None:
            raise CirkitError(f"{self.data}: no annotations/{split}.json; is --data the CIRCO folder?")
        return found

    def _image_dir(self) -> Path:
        root = self.image_root()
        return first_existing(root / "COCO2017_unlabeled" / "unlabeled2017", root / "unlabeled2017") or root

    def load(self, split: str) -> list[Task]:
        path = self._annotations(split)
        records = read_json(path, "CIRCO annotations")
        if not isinstance(records, list):
            raise RecordError(path, None, "expected a JSON list of records")
        image_dir = self._image_dir()
        gallery = _scan_gallery(image_dir)
        queries = []
        for i, rec in enumerate(records):
            qid = need(rec, "id", int, path, i)
            ref = need(rec, "reference_img_id", int, path, i)
            text = need(rec, "relative_caption", str, path, i)
            targets: list[str] = []
            if "target_img_id" in rec:
                target = need(rec, "target_img_id", int, path, i)
                gts = need(rec, "gt_img_ids", list, path, i)
                if not all(isinstance(g, int) for g in gts):
                    raise RecordError(path, None, f"record {i}: gt_img_ids must be integers", "gt_img_ids")
                targets = [str(target)] + [str(g) for g in gts if g != target]
            queries.append(Query(
                id=str(qid), reference=str(image_dir / coco_file(ref)), reference_id=str(ref), text=text,
                targets=targets, extra={"shared_concept": rec.get("shared_concept")},
            ))
        return [Task(
            name=split, gallery=gallery, queries=queries,
            has_ground_truth=any(q.targets for q in queries),
            exclude_reference=self.exclude_reference,
            recall_ks=KS, recall_first_target_only=True, map_ks=KS,
            details={"annotations": str(path), "images": str(image_dir)},
        )]

    def protocol(self) -> dict[str, Any]:
        return {"exclude_reference": self.exclude_reference, "recall_on": "target_img_id",
                "map_on": "gt_img_ids"}

    def write_submission(self, split: str, task: Task, ranked: Ranked, folder: Path) -> list[Path]:
        from cirkit.evaluate.submission import write_circo_submission

        return [write_circo_submission(folder / f"circo-{split}-submission.json", ranked.ids)]


def _scan_gallery(folder: Path) -> dict[str, Path]:
    """Every ``<digits>.jpg`` in ``folder``, sorted by id (a fixed order fixes tie-breaking)."""
    if not folder.is_dir():
        raise CirkitError(f"{folder}: no such folder; --images must hold the COCO unlabeled2017 images")
    found = []
    with os.scandir(folder) as it:
        for e in it:
            stem, ext = os.path.splitext(e.name)
            if ext.lower() == ".jpg" and stem.isdigit():
                found.append((int(stem), Path(e.path)))
    if not found:
        raise CirkitError(f"{folder}: no <id>.jpg images found; --images must hold the COCO unlabeled2017 images")
    found.sort()
    return {str(i): p for i, p in found}
