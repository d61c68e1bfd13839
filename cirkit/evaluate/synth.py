"""The synth benchmark written by ``cirkit synth``: ``meta.json`` lists ``splits``, each a generic folder.

Layout (see docs/architecture.md, "Synth benchmark layout")::

    OUT/benchmark/meta.json                 {"name": "synth", "splits": ["test", "compositional"], ...}
    OUT/benchmark/<split>/gallery.jsonl     generic format, image paths relative to the split folder
    OUT/benchmark/<split>/queries.jsonl

Every split is evaluated by default; ``--split`` picks some. Any folder with this
layout works, whatever its ``name``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cirkit.errors import CirkitError, RecordError
from cirkit.evaluate.base import Benchmark, Task
from cirkit.evaluate.generic import load_generic_task, read_meta


class SynthBenchmark(Benchmark):
    """A folder of generic-format splits named in ``meta.json``."""

    name = "synth"

    def __init__(self, data: Path, images: Path | None = None, **options: Any):
        super().__init__(data, images, **options)
        if (self.data / "benchmark" / "meta.json").exists() and not (self.data / "meta.json").exists():
            self.data = self.data / "benchmark"  # accept the synth OUT folder itself
        self.meta = read_meta(self.data)
        splits = self.meta.get("splits")
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
            raise RecordError(self.data / "meta.json", None, "expected a non-empty list of split folder names", "splits")
        self.splits = tuple(splits)
        self.name = str(self.meta.get("name", "synth"))

    def default_splits(self) -> list[str]:
        return list(self.splits)

    def load(self, split: str) -> list[Task]:
        if split not in self.splits:
            raise CirkitError(f"{self.data}: no split {split!r}; meta.json lists {', '.join(self.splits)}")
        folder = self.data / split
        split_meta = read_meta(folder)
        merged = {**{k: v for k, v in self.meta.items() if k in ("exclude_reference", "recall_ks")}, **split_meta}
        return [load_generic_task(folder, split, merged, self.options.get("exclude_reference"))]

    def primary_metric(self, split: str) -> str:
        return "R@1"

    def protocol(self) -> dict[str, Any]:
        excl = self.options.get("exclude_reference")
        return {"exclude_reference": bool(self.meta.get("exclude_reference", False) if excl is None else excl),
                "seed": self.meta.get("seed")}
