"""What every stage returns and prints: counts, skips, time, outputs; one line or JSON."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("cirkit")


@dataclass
class StageResult:
    """The summary of one stage run. ``counts`` are integers; ``skipped`` lists (item, reason)."""

    stage: str
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append((str(item), reason))

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "counts": self.counts,
            "skipped": len(self.skipped),
            "skipped_items": [{"item": i, "reason": r} for i, r in self.skipped],
            "outputs": self.outputs,
            "metrics": self.metrics,
            "seconds": round(self.seconds, 3),
            **({"details": self.details} if self.details else {}),
        }

    def line(self) -> str:
        parts = [f"{k.replace('_', ' ')} {v}" for k, v in self.counts.items()]
        parts.append(f"skipped {len(self.skipped)}")
        parts.append(f"{self.seconds:.1f}s")
        outs = ", ".join(self.outputs.values())
        return f"{self.stage}: " + ", ".join(parts) + (f" -> {outs}" if outs else "")


@contextmanager
def timed(result: StageResult):
    """Record the wall time of the block in ``result.seconds``."""
    t0 = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - t0


def progress_enabled() -> bool:
    return log.getEffectiveLevel() <= logging.INFO


def make_progress(*extra_columns: Any):
    """A rich progress bar on stderr (hidden under --quiet), with rate and ETA."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress_enabled(),
        transient=False,
    )


class Rate:
    """Tracks items/s for a progress bar's ``rate`` field."""

    def __init__(self, unit: str = "it"):
        self.unit, self.t0, self.n = unit, time.perf_counter(), 0

    def add(self, n: int) -> str:
        self.n += n
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return f"{self.n / dt:.1f} {self.unit}/s"


class Timer:
    """Wall-clock seconds per named section, summed over repeats (``with timer("search"): ...``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def line(self) -> str:
        """``open index 12.0 ms, search 1.31 s``: milliseconds under a second."""

        def fmt(s: float) -> str:
            return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"

        return ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in self.seconds.items())

    def rounded(self, digits: int = 4) -> dict[str, float]:
        return {k: round(v, digits) for k, v in self.seconds.items()}
