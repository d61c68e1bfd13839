"""GeneCIS (Vaze et al., CVPR 2023) from the official ``genecis/*.json`` files.

Data root (``--data``): the folder holding ``focus_object.json``, ``change_object.json``,
``focus_attribute.json``, ``change_attribute.json`` (any present; or its parent with
``genecis/``). Records: ``reference``, ``target``, ``gallery`` (list) and ``condition``
(the text). Object-task images are ``{"val_image_id": int}``; attribute-task images are
Visual Genome instances ``{"image_id": int, "instance_bbox": [x, y, w, h], ...}``.

Images (``--images``): COCO val2017 ``{id:012d}.jpg`` in that folder or its ``val2017/``;
Visual Genome ``{image_id}.jpg`` in that folder or its ``VG_100K/``, ``VG_100K_2/``.

Protocol, following the official ``eval_functions.validate``, ``COCOValSubset`` and
``VAWValSubset``:

- each query ranks its own gallery, ``[target] + gallery``; R@1/2/3 per task, and the
  split-level R@k is the mean over tasks (R@1 is the primary metric);
- records whose gallery length differs from the most common length are dropped, as the
  official loaders do (none in the released object files); the count is recorded;
- duplicate records (the upstream files repeat some verbatim) are all scored, as upstream;
- ties are pessimistic (another candidate with a score >= the target's ranks ahead), so a
  constant model scores 0, not the 100 that "target first + stable sort" would give;
- when the target also appears in its own gallery (change_object record 19), that copy
  is the same image: it is scored once, so it neither beats nor ties the target;
- attribute tasks use the official instance crops: the box widened by 0.7 x its size
  to the left/top, 1.7 x its size wide/high, clipped to the image, then padded to a
  square on black. Crops are written once to ``$CIRKIT_CACHE_DIR/genecis-crops``
  (default ``~/.cache/cirkit``) and reused.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from cirkit.errors import CirkitError, RecordError
from cirkit.evaluate.base import Benchmark, Task, first_existing, need, read_json
from cirkit.records import Query

OBJECT_TASKS = ("focus_object", "change_object")
ATTRIBUTE_TASKS = ("focus_attribute", "change_attribute")


class GeneCIS(Benchmark):
    """Adapter for the GeneCIS object tasks."""

    name = "genecis"
    default_split = "val"
    splits = ("val",)
    primary = "R@1"

    def __init__(self, data: Path, images: Path | None = None, **options: Any):
        super().__init__(data, images, **options)
        if not any((self.data / f"{t}.json").exists() for t in OBJECT_TASKS + ATTRIBUTE_TASKS) and (
            self.data / "genecis"
        ).is_dir():
            self.data = self.data / "genecis"

    def load(self, split: str) -> list[Task]:
        if split not in self.splits:
            raise CirkitError(f"GeneCIS has one split, 'val', not {split!r}")
        tasks = [self.load_task(t) for t in OBJECT_TASKS + ATTRIBUTE_TASKS if (self.data / f"{t}.json").exists()]
        if not tasks:
            raise CirkitError(f"{self.data}: no focus_object.json, change_object.json, focus_attribute.json or "
                              "change_attribute.json; is --data the GeneCIS folder?")
        return tasks

    def load_task(self, task: str) -> Task:
        path = self.data / f"{task}.json"
        records = read_json(path, f"GeneCIS {task}")
        if not isinstance(records, list):
            raise RecordError(path, None, "expected a JSON list of records")
        image = _CocoImages(self.image_root(), path) if task in OBJECT_TASKS else _VgCrops(self.image_root(), path)
        parsed = []
        for i, rec in enumerate(records):
            cond = need(rec, "condition", str, path, i)
            ref = image.key(rec.get("reference"), i, "reference")
            tgt = image.key(rec.get("target"), i, "target")
            gal = need(rec, "gallery", list, path, i)
            parsed.append((i, cond, ref, tgt, [image.key(g, i, "gallery") for g in gal]))
        modal = Counter(len(p[4]) for p in parsed).most_common(1)[0][0] if parsed else 0
        gallery: dict[str, Path] = {}
        queries = []
        dropped = 0
        for i, cond, ref, tgt, gal in parsed:
            if len(gal) != modal:
                dropped += 1
                continue
            for gid in (tgt, *gal):
                gallery.setdefault(gid, image.path(gid))
            queries.append(Query(
                id=f"{task}-{i}", reference=str(image.path(ref)), reference_id=ref,
                text=cond, targets=[tgt], candidates=[tgt, *gal],
            ))
        image.finish()
        return Task(
            name=task, gallery=gallery, queries=queries, recall_ks=(), candidate_ks=(1, 2, 3),
            details={"file": str(path), "gallery_length": modal + 1, "dropped_records": dropped},
        )

    def protocol(self) -> dict[str, Any]:
        return {"ties": "pessimistic", "target_copy_in_gallery": "scored once",
                "duplicates": "all scored", "gallery_length_filter": "modal",
                "attribute_crop": f"dilate {DILATION}, pad to square"}


class _CocoImages:
    """Object tasks: whole COCO val2017 images, keyed by their id."""

    def __init__(self, root: Path, path: Path):
        self.dir, self.file = first_existing(root / "val2017") or root, path

    def key(self, entry: Any, i: int, field: str) -> str:
        if not isinstance(entry, dict) or not isinstance(entry.get("val_image_id"), int):
            raise RecordError(self.file, None, f"record {i}: expected {{'val_image_id': int}}", field)
        return str(entry["val_image_id"])

    def path(self, key: str) -> Path:
        return self.dir / f"{int(key):012d}.jpg"

    def finish(self) -> None:
        pass


DILATION = 0.7  # the official VAWDataset settings
PAD_CROP = True


class _VgCrops:
    """Attribute tasks: Visual Genome instance crops, cut once into a cache folder."""

    def __init__(self, root: Path, path: Path):
        self.roots = [d for d in (root / "VG_100K", root / "VG_100K_2", root / "images", root) if d.is_dir()]
        self.file = path
        base = Path(os.environ.get("CIRKIT_CACHE_DIR", Path.home() / ".cache" / "cirkit"))
        self.cache = base / "genecis-crops"
        self.boxes: dict[str, tuple[int, list[float]]] = {}

    def key(self, entry: Any, i: int, field: str) -> str:
        bbox = entry.get("instance_bbox") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or not isinstance(entry.get("image_id"), int) or not isinstance(bbox, list)
                or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox)):
            raise RecordError(self.file, None, f"record {i}: expected {{'image_id': int, 'instance_bbox': [x, y, w, h]}}",
                              field)
        key = f"{entry['image_id']}_" + "_".join(f"{float(v):g}" for v in bbox)
        self.boxes[key] = (entry["image_id"], [float(v) for v in bbox])
        return key

    def path(self, key: str) -> Path:
        return self.cache / f"{key}.png"

    def finish(self) -> None:
        """Cut the crops not in the cache yet; a missing source image leaves its crop missing (skipped later)."""
        todo = [k for k in self.boxes if not self.path(k).exists()]
        if not todo:
            return
        from cirkit.errors import ImageError
        from cirkit.io import atomic_write, open_image

        self.cache.mkdir(parents=True, exist_ok=True)
        for key in todo:
            image_id, bbox = self.boxes[key]
            src = first_existing(*(d / f"{image_id}.jpg" for d in self.roots))
            if src is None:
                continue
            try:
                im = vaw_crop(open_image(src), bbox)
            except ImageError:
                continue
            with atomic_write(self.path(key), "wb") as fh:
                im.save(fh, format="PNG")


def vaw_crop(im, bbox: list[float]):
    """The official GeneCIS attribute crop of ``im`` at ``bbox`` = [x, y, w, h] (see module docstring)."""
    from PIL import Image

    x, y, w, h = bbox
    W, H = im.size
    left, top = max(0, x - DILATION * w), max(0, y - DILATION * h)
    right, bottom = min(W, left + (1 + DILATION) * w), min(H, top + (1 + DILATION) * h)
    im = im.crop((left, top, right, bottom))
    if PAD_CROP and im.width != im.height:
        side = max(im.width, im.height)
        out = Image.new(im.mode, (side, side), (0, 0, 0))
        if im.width > im.height:
            out.paste(im, (0, (im.width - im.height) // 2))
        else:
            out.paste(im, ((im.height - im.width) // 2, 0))
        im = out
    return im
