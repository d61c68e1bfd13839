"""Errors meant for people: the CLI prints them as one line and exits with their code."""

from __future__ import annotations

from pathlib import Path


class CirkitError(Exception):
    """A user error (bad input, missing file, wrong flag): printed without a traceback, exit 1."""

    exit_code = 1


class RecordError(CirkitError):
    """A malformed record in a JSONL/JSON file, located by file, line and field."""

    def __init__(self, path: str | Path, line: int | None, message: str, field: str | None = None):
        self.path, self.line, self.field = str(path), line, field
        where = f"{path}:{line}" if line is not None else f"{path}"
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}")


class ImageError(CirkitError):
    """An image that cannot be decoded safely (counted as skipped unless --strict)."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class CheckpointError(CirkitError):
    """A checkpoint folder that is missing files or was made by another backbone."""
