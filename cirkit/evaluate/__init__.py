"""The ``evaluate`` stage and the benchmark adapters it scores on.

:mod:`cirkit.evaluate.stage` is the stage (``EvaluateConfig``, ``run``: embed, rank exactly, score
with :mod:`cirkit.metrics`); each adapter module turns one benchmark's official files into
:class:`~cirkit.evaluate.base.Task` lists (:mod:`cirkit.evaluate.base` holds the shared protocol:
ties, pessimistic ranks, subsets); :mod:`cirkit.evaluate.submission` writes and checks the
official test-server files. ``load_benchmark`` picks an adapter by name or detects it:

| name        | ``--data``                                   | ``--images``                      |
|-------------|----------------------------------------------|-----------------------------------|
| fashioniq   | root with captions/, image_splits/           | folder of ``<asin>.png``          |
| cirr        | root with captions/, image_splits/ (rc2)     | NLVR2 root (``dev/``, ``test1/``) |
| circo       | CIRCO folder with annotations/               | COCO ``unlabeled2017``            |
| genecis     | folder with focus_object.json, ...           | COCO ``val2017`` (+ VG for attributes) |
| generic     | folder with gallery.jsonl, queries.jsonl     | (paths in the JSONL files)        |
| synth       | folder with meta.json listing ``splits``     | (paths in the JSONL files)        |
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cirkit.errors import CirkitError

if TYPE_CHECKING:
    from cirkit.evaluate.base import Benchmark

BENCHMARKS = ("fashioniq", "cirr", "circo", "genecis", "generic", "synth")


def detect_benchmark(data: str | Path) -> str:
    """Guess the benchmark from the files in ``data`` (used when no name is given)."""
    d = Path(data)
    if (d / "meta.json").exists() and not (d / "gallery.jsonl").exists():
        return "synth"
    if (d / "benchmark" / "meta.json").exists():
        return "synth"
    if (d / "gallery.jsonl").exists():
        return "generic"
    if list((d / "captions").glob("cap.dress.*.json")):
        return "fashioniq"
    if list((d / "captions").glob("cap.rc*.json")) or list((d / "cirr" / "captions").glob("cap.rc*.json")):
        return "cirr"
    if (d / "annotations" / "val.json").exists() or (d / "annotations" / "test.json").exists():
        return "circo"
    tasks = ("focus_object", "change_object", "focus_attribute", "change_attribute")
    if any((d / s / f"{t}.json").exists() for s in (".", "genecis") for t in tasks):
        return "genecis"
    raise CirkitError(f"{d}: cannot tell which benchmark this is; name it ({', '.join(BENCHMARKS)})")


def load_benchmark(name: str | None, data: str | Path, images: str | Path | None = None, **options: Any) -> Benchmark:
    """The adapter for ``name`` (or the detected one) over ``data``."""
    if data is None:
        hint = f"; {name!r} is a folder: pass it as --data {name}" if name and Path(name).exists() else ""
        from cirkit.config import UsageError

        raise UsageError(f"no benchmark data; pass --data (the annotation root or benchmark folder){hint}")
    name = (name or detect_benchmark(data)).lower()
    data = Path(data)
    images = Path(images) if images is not None else None
    if name == "fashioniq":
        from cirkit.evaluate.fashioniq import FashionIQ as cls
    elif name == "cirr":
        from cirkit.evaluate.cirr import CIRR as cls
    elif name == "circo":
        from cirkit.evaluate.circo import CIRCO as cls
    elif name == "genecis":
        from cirkit.evaluate.genecis import GeneCIS as cls
    elif name == "generic":
        from cirkit.evaluate.generic import GenericBenchmark as cls
    elif name == "synth":
        from cirkit.evaluate.synth import SynthBenchmark as cls
    else:
        hint = "; to evaluate that folder pass it as --data" if Path(name).exists() else ""
        raise CirkitError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}{hint}")
    return cls(data, images, **options)


from cirkit.evaluate.stage import EvaluateConfig, run  # noqa: E402  (the stage: light imports only)

__all__ = ["BENCHMARKS", "EvaluateConfig", "detect_benchmark", "load_benchmark", "run"]
