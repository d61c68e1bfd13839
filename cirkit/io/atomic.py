"""Whole-file outputs appear complete or not at all: write to a temp sibling, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cirkit.errors import CirkitError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temp file next to ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; outputs get the usual file mode
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=indent, ensure_ascii=False)
        fh.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temp name and swap it in whole (checkpoints, benchmark folders).

    The swap is two renames (old folder aside, new one in); a crash between them leaves only
    the set-aside copy, which :func:`restore_dir` (called here and by readers that resume)
    puts back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; outputs get the usual folder mode
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore_dir(path: str | Path) -> bool:
    """Undo a swap that :func:`atomic_dir` started but a crash cut short; True if it restored one."""
    path = Path(path)
    if not path.parent.is_dir():
        return False
    aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if path.exists():  # the swap finished; a crash before the cleanup left the old copy behind
        for stale in aside:
            shutil.rmtree(stale, ignore_errors=True)
        return False
    if not aside:
        return False
    os.replace(aside[-1], path)
    for stale in aside[:-1]:
        shutil.rmtree(stale, ignore_errors=True)
    return True


def safe_join(root: str | Path, relative: str | Path) -> Path:
    """Join ``relative`` under ``root``, refusing paths that escape it (``..``, absolute)."""
    root = Path(root).resolve()
    out = (root / relative).resolve()
    if out != root and root not in out.parents:
        raise CirkitError(f"output path {relative!s} escapes the output folder {root}")
    return out
