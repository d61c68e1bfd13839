"""A JSONL output written by several processes at once: one part file per process, merged once.

Under ``accelerate launch`` each process appends its records to its own
``<output>.part-<rank>`` (through :class:`~cirkit.io.JsonlAppender`: whole lines, flushed, no
id twice), so no two processes ever write one file and lines cannot interleave. When every
process is done, the main process appends each part's records to the output through the same
appender (which drops ids already there) and only then deletes the parts. Any interruption
leaves the parts, and the next run (any number of processes) counts ids in the output *and*
every part as done and merges the leftovers, so each id ends up in the output exactly once.

:func:`jsonl_shard` is the whole protocol as one context manager; ``caption`` uses it, and any
stage that writes per-record JSONL (``reformulate``) can::

    proc = process_info()
    with jsonl_shard(out, proc, wait, "triplets file") as shard:
        todo = [x for x in my_share(items, proc) if x.id not in shard.done]
        with JsonlAppender(shard.target) as writer:
            ...

The part files live beside the output, so a run over several machines needs that folder on a
shared file system (the Lance outputs of ``embed`` need no shared folder: see
:mod:`cirkit.io.embeddings`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cirkit.errors import RecordError
from cirkit.io.atomic import glob_escape, is_stdio
from cirkit.io.jsonl import JsonlAppender, iter_complete
from cirkit.io.lock import output_lock


def part_path(output: Path, rank: int) -> Path:
    """The part file process ``rank`` appends to."""
    return output.with_name(f"{output.name}.part-{rank}")


def parts(output: Path) -> list[Path]:
    """The part files ranks wrote: exactly ``<output>.part-<rank>`` (a user's other files are never merged)."""
    if not output.parent.is_dir():
        return []
    found = output.parent.glob(f"{glob_escape(output.name)}.part-*")
    return sorted(p for p in found if p.name[len(output.name) + len(".part-"):].isdigit())


def records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Complete records of an output or part (a torn last line, still being written or left by a
    crash, is passed over); a complete line that is not a record with an id is an error, never dropped."""
    for lineno, obj in iter_complete(path):
        if not isinstance(obj, dict) or "id" not in obj:
            raise RecordError(path, lineno, "expected a JSON object with an 'id'; fix or remove this line")
        yield lineno, obj


def ids_in(path: Path) -> set[str]:
    return {str(obj["id"]) for _, obj in records(path)}


def done_ids(output: Path) -> set[str]:
    """Ids already written: in the output and in every part file left by any earlier run."""
    if is_stdio(output):  # standard output: nothing to resume
        return set()
    done = ids_in(output)
    for part in parts(output):
        done |= ids_in(part)
    return done


def merge_parts(output: Path) -> int:
    """Append the records of every ``output.part-<rank>`` to ``output`` (once per id), then delete the parts."""
    found = [] if is_stdio(output) else parts(output)
    if not found:
        return 0
    moved = 0
    with JsonlAppender(output) as writer:
        for part in found:
            for _, obj in records(part):
                moved += writer.write(obj)
    for part in found:  # only after everything is safely in the output
        part.unlink(missing_ok=True)
    return moved


@contextlib.contextmanager
def locked(output: Path, rank: int, world: int, wait: bool, what: str) -> Iterator[None]:
    """The single-writer locks of this process: the output (main process) and its own part file."""
    with contextlib.ExitStack() as stack:
        if rank == 0:
            stack.enter_context(output_lock(output, wait=wait, what=what))
        if world > 1:
            stack.enter_context(output_lock(part_path(output, rank), wait=wait, what=f"{what} part"))
        yield


@dataclass
class JsonlShard:
    """This process's side of a sharded JSONL output (see :func:`jsonl_shard`)."""

    target: Path                      # where this process appends: the output, or its part file
    done: set[str] = field(default_factory=set)   # ids written by any earlier run (output + parts)
    merged: int = 0                   # records the main process moved from parts into the output


@contextlib.contextmanager
def jsonl_shard(output: Path, proc: Any, wait: bool = False, what: str = "output") -> Iterator[JsonlShard]:
    """Hold the locks, read what is done, and (on leaving) merge every part into ``output`` on the main process.

    Every process has read ``done`` before any appends (a barrier), and every process has
    finished before the merge (another). Leaving with an error merges nothing: the parts stay
    for the next run.
    """
    output = Path(output)
    with locked(output, proc.rank, proc.world, wait, what):
        shard = JsonlShard(target=output if proc.world == 1 else part_path(output, proc.rank),
                           done=done_ids(output))
        proc.wait()  # everyone has read the done set before anyone appends
        yield shard
        proc.wait()
        if proc.is_main:
            shard.merged = merge_parts(output)
