"""JSONL reading with file:line errors, and resumable exactly-once appending."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from cirkit.errors import CirkitError, RecordError
from cirkit.io.atomic import atomic_write
from cirkit.records import Record

R = TypeVar("R", bound=Record)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; bad lines raise RecordError."""
    path = Path(path)
    if str(path) != "-" and not path.exists():
        raise CirkitError(f"{path}: no such file")
    fh = open(path, "rb") if str(path) != "-" else __import__("sys").stdin.buffer
    try:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(path, lineno, f"not valid UTF-8 (byte {e.start}): save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                # without the line break, so a line cut short reports a column on this line
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise RecordError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
            yield lineno, obj
    finally:
        if fh is not __import__("sys").stdin.buffer:
            fh.close()


def iter_complete(path: str | Path, skip_malformed: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, value)`` for each complete non-blank line of an output being appended to.

    Only newline-terminated lines count: a torn last line (still being written, or left by a
    crash) is passed over, and so is a file not created yet. A complete line that is not UTF-8
    JSON raises RecordError, or is passed over when ``skip_malformed``. Values are not checked
    to be objects.
    """
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                return  # the torn tail: only the last line can lack its newline
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8").rstrip("\r\n"))  # columns count on this line
            except UnicodeDecodeError as e:
                if skip_malformed:
                    continue
                raise RecordError(path, lineno, f"not valid UTF-8 (byte {e.start}): save the file as UTF-8") from None
            except json.JSONDecodeError as e:
                if skip_malformed:
                    continue
                raise RecordError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
            yield lineno, obj


def read_records(path: str | Path, cls: type[R], unique: bool = True) -> list[R]:
    """Read a whole JSONL file of ``cls`` records; duplicate ids are an error when ``unique``."""
    out: list[R] = []
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl(path):
        rec = cls.from_dict(obj, path, lineno)
        if unique:
            key = rec.key
            if key in seen:
                raise RecordError(path, lineno, f"duplicate id {key!r} (first on line {seen[key]})", "id")
            seen[key] = lineno
        out.append(rec)
    return out


def write_jsonl(path: str | Path, records: Iterable[Record | dict]) -> int:
    """Write a whole JSONL file atomically; returns the number of records."""
    n = 0
    with atomic_write(path) as fh:
        for rec in records:
            obj = rec.to_dict() if isinstance(rec, Record) else rec
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n


class JsonlAppender:
    """Append records one by one, so a killed job keeps what it finished.

    On open, an existing file is scanned: a torn last line (a crash mid-write) is cut
    off, and the ids already present are loaded so a re-run skips them. Each record is
    written as one ``write`` of a full line followed by a flush, so readers never see
    half a record after the process dies (the OS keeps what was written).
    """

    def __init__(self, path: str | Path, key: str = "id", fsync: bool = False):
        self.path = Path(path)
        self.key = key
        self.fsync = fsync
        self.done: set[str] = set()
        self.written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._recover()
        self._fh = open(self.path, "ab")

    def _recover(self) -> None:
        try:
            for _, obj in iter_complete(self.path):
                if isinstance(obj, dict) and self.key in obj:
                    self.done.add(str(obj[self.key]))
        except RecordError as e:
            raise RecordError(
                self.path, e.line, "malformed line in an output being resumed; fix or delete the file"
            ) from None
        self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        """Drop what follows the last newline: a line torn by a crash mid-write."""
        with open(self.path, "rb") as fh:
            end = pos = fh.seek(0, os.SEEK_END)
            while pos > 0:  # scan back from the end: the torn part is at most one record long
                step = min(pos, 1 << 16)
                fh.seek(pos - step)
                nl = fh.read(step).rfind(b"\n")
                if nl != -1:
                    pos += nl + 1 - step
                    break
                pos -= step
        if pos < end:
            with open(self.path, "r+b") as fh:
                fh.truncate(pos)

    def __contains__(self, key: object) -> bool:
        return str(key) in self.done

    def write(self, record: Record | dict) -> bool:
        """Append one record unless its id is already present; returns whether it was written."""
        obj = record.to_dict() if isinstance(record, Record) else record
        key = str(obj[self.key])
        if key in self.done:
            return False
        self._fh.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        self.done.add(key)
        self.written += 1
        return True

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
