"""One writer per output: an advisory lock held for the whole run, naming its holder.

Every output a stage writes (a JSONL file, a Lance store, an index table, a checkpoint folder,
a submission folder, a cache) is written under :func:`output_lock`. The lock is a hidden file
beside the output, ``.<name>.lock``, locked with ``flock`` through :mod:`filelock`; the kernel
drops the lock when its process dies, so a stale lock of a killed run is simply free again.
The holder writes who it is (pid, host, start time, command) into the lock file, so a second
writer fails at once with one line naming the holder, or waits for it with ``wait=True``.
The holder removes the lock file before it lets go, so a finished run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cirkit.errors import CirkitError

log = logging.getLogger("cirkit")


class OutputBusy(CirkitError):
    """Another process holds the output's lock."""


def lock_file_for(output: str | Path) -> Path:
    """The lock file of ``output``: a hidden sibling, so swapping the output in leaves it alone."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


def _holder_record() -> bytes:
    return json.dumps({
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else "",
    }).encode()


def describe_holder(lock_file: str | Path) -> str:
    """``pid 123 on host since 2026-11-27 13:40:02: cirkit embed ...``, or a plain phrase when unknown."""
    try:
        info = json.loads(Path(lock_file).read_bytes() or b"{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    where = f"pid {info['pid']} on {info.get('host', '?')} since {info.get('started', '?')}"
    return where + (f": {info['command']}" if info.get("command") else "")


def _write_holder(fd: int) -> None:
    record = _holder_record()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)


@contextlib.contextmanager
def output_lock(output: str | Path, wait: bool = False, what: str = "output") -> Iterator[Path]:
    """Hold the single-writer lock of ``output`` for the block; yields the lock file's path.

    A lock held by another live process is an :class:`OutputBusy` error naming it, unless
    ``wait``, in which case this blocks until it is free. The parent folder is created.
    """
    from cirkit.io.atomic import is_stdio

    output = Path(output)
    if is_stdio(output):  # standard output belongs to this process: nothing to share, nothing to lock
        yield output
        return
    path = lock_file_for(output)
    made = _missing_ancestors(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        _remove_empty(made)
        raise CirkitError(f"{output}: its parent {path.parent} is a file, not a folder; choose another output") from None
    except OSError as e:
        _remove_empty(made)
        raise CirkitError(f"{output}: cannot create its folder {path.parent} ({e.strerror}); "
                          "choose an output in a folder you can write") from None
    try:
        lock = _take(output, path, wait, what)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield path
    except Exception as e:
        # An error met while writing (a full disk in a library's write, a Lance I/O error) often
        # names no file: the error boundary names this output instead (cirkit.cli._common.describe).
        if getattr(e, "cirkit_output", None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                e.cirkit_output = str(output)
        raise
    finally:
        # Unlinked while still held, so an output leaves no lock file behind: a waiter that opened
        # this inode sees it unlinked once it gets the lock and opens the path again (filelock checks
        # st_nlink after flock), so two holders can never lock two different files.
        with contextlib.suppress(OSError):
            path.unlink()
        lock.release()
        _remove_empty(made)  # folders made only for the lock, left empty by a run that wrote nothing


def _take(output: Path, path: Path, wait: bool, what: str):
    """The acquired lock of ``path``: at once, or (``wait``) once its holder lets go."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path), blocking=False, preserve_lock_file=True, on_acquired=_write_holder)
    try:
        _acquire(lock, output, path)
    except Timeout:
        holder = describe_holder(path)
        if not wait:
            raise OutputBusy(
                f"{output}: another cirkit run is writing this {what} ({holder}); "
                f"wait for it to finish, or pass --wait to queue behind it"
            ) from None
        log.info("%s: waiting for %s to finish writing it", output, holder)
        lock = FileLock(str(path), blocking=True, preserve_lock_file=True, on_acquired=_write_holder)
        _acquire(lock, output, path)
    return lock


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are still empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def _missing_ancestors(folder: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create for ``folder``, deepest first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing


def _acquire(lock, output: Path, path: Path) -> None:
    """``lock.acquire()``, with an unwritable folder (read-only, full disk) as a one-line error."""
    from filelock import Timeout

    try:
        lock.acquire()
    except Timeout:
        raise
    except OSError as e:
        raise CirkitError(f"{output}: cannot write its lock file {path} ({e.strerror}); "
                          "choose an output in a folder you can write") from None


def is_locked(output: str | Path) -> bool:
    """Whether some process holds ``output``'s lock now (for readers that must not build concurrently)."""
    from filelock import FileLock, Timeout

    path = lock_file_for(output)
    if not path.exists():
        return False
    probe = FileLock(str(path), blocking=False, preserve_lock_file=True)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False
