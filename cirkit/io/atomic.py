"""Whole outputs appear complete or not at all, and cirkit only ever replaces what it created.

* :func:`atomic_write` writes a file under a temp name beside it, then renames it in.
* :func:`atomic_dir` builds a folder under a temp name and swaps it in whole. The folder
  gets an ownership marker (:data:`MARKER`, naming the kind of output), and an existing
  folder is only replaced when it is empty or carries the same marker
  (:func:`check_replaceable`): cirkit never deletes what it did not create.
* Temp files and folders are named ``.<name>.cirkit-tmp-<host>-<pid>-<random>`` and set-aside
  copies ``.<name>.cirkit-old-<host>-<pid>``, so the next run can tell whose they are and
  removes those whose process is dead (:func:`remove_dead_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cirkit.errors import CirkitError

MARKER = ".cirkit-output.json"  # {"kind": ..., "cirkit": version} inside every folder atomic_dir swaps in
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TEMP_RE = re.compile(r"\.cirkit-(tmp|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)(-[0-9a-f]+)?$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A recognisable sibling name for ``path`` owned by this process (``kind``: tmp or old)."""
    suffix = f"-{secrets.token_hex(4)}" if kind == "tmp" else ""
    return path.with_name(f".{path.name}.cirkit-{kind}-{_HOST}-{os.getpid()}{suffix}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _owner(entry: Path, name: str) -> tuple[str, str, int] | None:
    """``(kind, host, pid)`` of a temp/set-aside sibling of ``name``, or None if it is not one."""
    prefix = f".{name}"
    if not entry.name.startswith(prefix):
        return None
    m = _TEMP_RE.fullmatch(entry.name[len(prefix):])
    return (m.group(1), m.group("host"), int(m.group("pid"))) if m else None


def remove_dead_temps(path: str | Path) -> int:
    """Remove temp files/folders of ``path`` left by dead processes on this host; returns how many."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return 0
    removed = 0
    for entry in parent.glob(f".{glob_escape(path.name)}.cirkit-tmp-*"):
        owner = _owner(entry, path.name)
        if owner is None or owner[1] != _HOST or pid_alive(owner[2]):
            continue
        _remove(entry)
        removed += 1
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def is_stdio(path: str | Path | None) -> bool:
    """Whether ``path`` is ``-``: standard output for a per-record output, standard input for an input."""
    return path is not None and str(path) == "-"


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8", kind: str | None = None,
                 owned: Callable[[Path], bool] | None = None) -> Iterator[Any]:
    """Open a temp file next to ``path``; on success fsync and rename it over ``path``.

    ``kind``/``owned``: see :func:`check_file_output` (a user-named output replaces only its own kind).
    """
    path = Path(path)
    if is_stdio(path):
        raise CirkitError("-: this output is written whole, not streamed record by record; give a file path")
    check_file_output(path, kind, owned)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
    except OSError as e:
        raise _about(e, path) from None
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _about(e, path) from None
        raise


def _about(e: OSError, path: Path) -> OSError:
    """``e`` naming ``path`` (the output) instead of our temp name or no file at all (a full disk's write())."""
    if e.filename is None or ".cirkit-tmp-" in str(e.filename) or ".cirkit-old-" in str(e.filename):
        return type(e)(e.errno, e.strerror, str(path)) if e.errno is not None else e
    return e


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, kind: str | None = None,
                      owned: Callable[[Path], bool] | None = None) -> None:
    """Write ``obj`` as JSON atomically (``kind``/``owned``: see :func:`check_file_output`)."""
    with atomic_write(path, kind=kind, owned=owned) as fh:
        json.dump(obj, fh, indent=indent, ensure_ascii=False)
        fh.write("\n")


def check_file_output(path: str | Path, kind: str | None = None, owned: Callable[[Path], bool] | None = None) -> None:
    """Refuse a file output cirkit must not write: a folder, a link, a device/FIFO/socket, a path under a file.

    With ``owned`` (a recogniser of the ``kind`` of file this output is), an existing non-empty
    file is only replaced when cirkit wrote it: a report, metrics or submission file never
    lands on a user's file (or on the run's own inputs) by a mistyped ``-o``.
    """
    path = Path(path)
    if is_stdio(path):
        return
    if path.is_symlink():
        raise CirkitError(
            f"{path}: is a symbolic link; cirkit does not write through or replace links, pass the file it points "
            f"to ({os.path.realpath(path)}) or a new path"
        )
    if path.is_dir():
        raise CirkitError(f"{path}: is a folder, but a file is written here; choose a file path")
    if path.exists() and not path.is_file():
        raise CirkitError(f"{path}: is not a regular file (a device, FIFO or socket); choose a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CirkitError(f"{path}: {parent} is a file, not a folder; choose another output path")
            break
    if owned is not None and path.is_file() and path.stat().st_size > 0 and not owned(path):
        raise CirkitError(
            f"{path}: already exists and cirkit did not write it (it only replaces its own {kind or 'output'}s); "
            "choose a new file name, or remove this file yourself"
        )


def read_head(path: Path, size: int = 4096) -> bytes:
    """The first ``size`` bytes of a file (empty if unreadable): for recognising what a file is."""
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError:
        return b""


def read_small_json(path: Path, max_bytes: int = 64 << 20) -> Any:
    """A JSON file's value, or None when it is not one (or is too big to be one cirkit wrote)."""
    try:
        if path.stat().st_size > max_bytes:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def check_utf8_path(path: str | Path, what: str = "output") -> None:
    """Refuse a path whose bytes are not UTF-8 (a Linux name): it would fail only when written into a file."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise CirkitError(f"{shown}: the {what} path is not valid UTF-8; choose a path of UTF-8 characters") from None


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The ownership marker of a folder cirkit wrote, or None."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_replaceable(path: str | Path, kind: str, owned: Callable[[Path], bool] | None = None) -> None:
    """Refuse to replace ``path`` unless it is absent, empty, or a ``kind`` folder cirkit wrote.

    ``owned`` recognises folders of this kind written before markers existed.
    """
    path = Path(path)
    if path.is_symlink():
        raise CirkitError(
            f"{path}: is a symbolic link; cirkit does not replace links, pass the folder it points to "
            f"({os.path.realpath(path)}) or a new folder"
        )
    if not path.exists():
        return
    if not path.is_dir():
        raise CirkitError(f"{path}: exists and is not a folder; choose another output folder")
    here = Path.cwd().resolve()
    real = path.resolve()
    if real == here or real in here.parents:
        raise CirkitError(f"{path}: is the current folder or one above it; write the {kind} to a new subfolder")
    if not any(path.iterdir()):
        return
    marker = read_marker(path)
    if marker is not None and marker.get("kind") == kind:
        return
    if marker is None and owned is not None and owned(path):
        return
    found = f"a cirkit {marker.get('kind')}" if marker else "files cirkit did not write"
    raise CirkitError(
        f"{path}: holds {found}; cirkit only replaces a {kind} folder it created, so choose a new or empty folder"
    )


@contextlib.contextmanager
def atomic_dir(path: str | Path, kind: str = "output", owned: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Build a folder under a temp name and swap it in whole (checkpoints, benchmark folders).

    Only a folder that :func:`check_replaceable` allows is replaced; the new one carries the
    :data:`MARKER` of ``kind``. The swap exchanges the two names in one step where the
    system can (Linux ``renameat2``), so a reader always finds the old folder or the new one;
    elsewhere it is two renames (old folder aside, new one in), and a crash between them
    leaves only the set-aside copy, which :func:`restore_dir` (called here and by readers
    that resume) puts back.
    """
    from cirkit import __version__

    path = Path(path)
    check_replaceable(path, kind, owned)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_dir(path)
    remove_dead_temps(path)
    tmp = temp_name(path)
    try:
        tmp.mkdir(mode=0o777 & ~_umask())
    except OSError as e:
        raise _about(e, path) from None
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind, "cirkit": __version__}) + "\n", encoding="utf-8")
        check_replaceable(path, kind, owned)  # again: the folder may have changed while we worked
        if path.exists() and _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
            return
        old = None
        if path.exists():
            old = temp_name(path, "old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _about(e, path) from None
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl < 1.2.x)
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):  # a file system that cannot
        return False
    raise OSError(err, os.strerror(err), str(b))


def _aside_copies(path: Path) -> list[Path]:
    """Set-aside copies of ``path`` (this scheme's and the older ``.<name>.old-<pid>``), oldest first."""
    found = [p for p in path.parent.glob(f".{glob_escape(path.name)}.*")
             if (_owner(p, path.name) or ("", "", 0))[0] == "old" or re.fullmatch(rf"\.{re.escape(path.name)}\.old-\d+", p.name)]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def restore_dir(path: str | Path) -> bool:
    """Undo a swap that :func:`atomic_dir` started but a crash cut short; True if it restored one."""
    path = Path(path)
    if not path.parent.is_dir():
        return False
    aside = _aside_copies(path)
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


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def check_name(name: str, what: str) -> str:
    """A user-given name that becomes one path component (a table, an id in a file name).

    No separators, no ``..``, not absolute, not hidden, no control characters.
    """
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or name.startswith(".") or not _NAME_RE.fullmatch(name) or len(name) > 200):
        raise CirkitError(
            f"{what} {name!r} is not a plain name: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )
    return name


def safe_join(root: str | Path, relative: str | Path) -> Path:
    """Join ``relative`` under ``root``, refusing paths that escape it (``..``, absolute)."""
    if "\x00" in str(relative):
        raise CirkitError(f"output name {str(relative)!r} contains a NUL character; no file name can hold one")
    root = Path(root).resolve()
    out = (root / relative).resolve()
    if out != root and root not in out.parents:
        raise CirkitError(f"output path {relative!s} escapes the output folder {root}")
    return out
