"""JSONL reading with file:line errors, and resumable exactly-once appending.

What a line may hold is decided here, once, for every JSONL file cirkit reads:

| on a line                                   | outcome                                             |
|---------------------------------------------|-----------------------------------------------------|
| a JSON object                               | read                                                |
| blank (spaces, ``\\r``)                      | passed over                                         |
| CRLF line ending, UTF-8 BOM at a line start | accepted (files from Windows tools)                 |
| a value that is not an object               | RecordError "expected a JSON object"                |
| more than :data:`MAX_LINE_BYTES` bytes       | RecordError, the limit in the message (not read whole) |
| nested deeper than :data:`MAX_DEPTH`         | RecordError (Python's parser would hit RecursionError) |
| an integer of more than 4300 digits         | RecordError (Python refuses to convert it)          |
| ``NaN``, ``Infinity``, ``1e999``            | RecordError (not JSON; written back they would break other readers) |
| ``\\u0000`` or a lone surrogate (``\\ud800``)  | RecordError naming the field (NUL breaks paths; a lone surrogate cannot be written back as UTF-8) |
| the same key twice in one object            | RecordError naming the key (which value is meant is ambiguous) |
| bytes that are not UTF-8; UTF-16 text       | RecordError "save the file as UTF-8"               |

Each error is one line: ``file:line: [field 'x': ]what is wrong and what to do``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from cirkit.errors import CirkitError, RecordError
from cirkit.io.atomic import atomic_write, check_file_output, is_stdio
from cirkit.records import Record

R = TypeVar("R", bound=Record)
log = logging.getLogger("cirkit")

MAX_LINE_BYTES = 16 * 1024 * 1024  # one record per line; far above any record cirkit writes
MAX_DEPTH = 100  # nesting levels; Python's parser and encoder recurse and fail near 1000
_BOM = b"\xef\xbb\xbf"
# Escapes that can decode to NUL or to a (possibly lone) surrogate: only then is a line walked.
_SUSPECT = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Refused(ValueError):
    """A syntactically valid line holding a value cirkit does not accept."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, _printable(field)


def _printable(name: str | None) -> str | None:
    """A key as it can appear in a one-line message: control characters and surrogates escaped."""
    if name is None or name.isprintable():
        return name
    return name.encode("unicode_escape").decode("ascii")


class _Malformed(ValueError):
    """Not UTF-8 JSON at all: a torn tail looks like this."""


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not valid JSON; write null or a finite number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused(f"the number {text[:40]} is out of range for a 64-bit float")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Refused("appears twice in one object; keep one", dup)
    return obj


_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_constant, object_pairs_hook=_object)


def _check_values(obj: Any) -> None:
    """Depth, NUL and lone surrogates, with the top-level field they sit under."""
    stack: list[tuple[Any, int, str | None]] = [(obj, 0, None)]
    while stack:
        value, depth, field = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise _Refused("contains a NUL character (\\u0000); remove it", field)
            m = _SURROGATE.search(value)
            if m:
                raise _Refused(
                    f"contains a lone surrogate (\\u{ord(m.group()):04x}), which is not Unicode text; fix the escape",
                    field,
                )
            continue
        if depth >= MAX_DEPTH and isinstance(value, (dict, list)):
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep; records are flat objects", field)
        if isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, depth + 1, field if field is not None else k))
                stack.append((v, depth + 1, field if field is not None else k))
        elif isinstance(value, list):
            stack.extend((v, depth + 1, field) for v in value)


def _decode(raw: bytes, lineno: int) -> Any:
    """The JSON value of one line (without or with its line break); raises _Malformed / _Refused."""
    if lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise _Refused("the file is UTF-16 text; save it as UTF-8")
    offset = 0
    if raw.startswith(_BOM):  # deliberate: Windows tools start files (and so concatenations) with one
        raw, offset = raw[3:], 3
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed(f"not valid UTF-8 (byte {e.start + offset}): save the file as UTF-8") from None
    try:
        # without the line break, so a line cut short reports a column on this line
        obj = _DECODER.decode(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise _Malformed(f"malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise _Refused(f"nested more than {MAX_DEPTH} levels deep; records are flat objects") from None
    except _Refused:
        raise
    except ValueError as e:  # Python's int conversion limit ("Exceeds the limit (4300 digits) ...")
        if "digits" in str(e):
            raise _Refused(
                f"an integer has more than {sys.get_int_max_str_digits()} digits; store such a value as a string"
            ) from None
        raise _Refused(f"a value cannot be read ({str(e)[:80]})") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH or _SUSPECT.search(raw):
        _check_values(obj)
    return obj


def decode_line(raw: bytes, path: str | Path, lineno: int) -> Any:
    """The JSON value of one raw line, or a RecordError naming ``path:lineno`` (and the field)."""
    try:
        return _decode(raw, lineno)
    except _Refused as e:
        raise RecordError(path, lineno, e.message, e.field) from None
    except _Malformed as e:
        raise RecordError(path, lineno, str(e)) from None


def _too_long(path: str | Path, lineno: int) -> RecordError:
    return RecordError(
        path, lineno,
        f"line longer than {MAX_LINE_BYTES // 2**20} MiB ({MAX_LINE_BYTES} bytes), the limit for one record; "
        "is this a JSONL file (one JSON object per line)?",
    )


def _skip_rest(fh: BinaryIO) -> bool:
    """Read past the rest of an overlong line; True if it ended with a line break."""
    while True:
        chunk = fh.readline(1 << 20)
        if not chunk:
            return False
        if chunk.endswith(b"\n"):
            return True


def _lines(fh: BinaryIO) -> Iterator[tuple[int, bytes | None, bool]]:
    """``(line number, raw bytes or None if over the limit, ends with a line break)``, memory bounded."""
    lineno = 0
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            yield lineno, None, _skip_rest(fh)
        else:
            yield lineno, raw, raw.endswith(b"\n")


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise CirkitError(f"{path}: no such file")
    if path.is_dir():
        raise CirkitError(f"{path}: is a folder; give a JSONL file (one JSON object per line)")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; a bad line raises RecordError.

    Every line must be a JSON object (see the module table for what else is refused).
    ``-`` reads standard input.
    """
    path = Path(path)
    stdin = str(path) == "-"
    if not stdin:
        _check_readable(path)
    try:
        fh = sys.stdin.buffer if stdin else open(path, "rb")
    except OSError as e:
        raise CirkitError(f"{path}: cannot read ({e.strerror})") from None
    try:
        for lineno, raw, _ in _lines(fh):
            if raw is None:
                raise _too_long(path, lineno)
            if not raw.strip() or raw.strip() == _BOM:
                continue
            obj = decode_line(raw, path, lineno)
            if not isinstance(obj, dict):
                raise RecordError(path, lineno, f"expected a JSON object, got {_kind(obj)}")
            yield lineno, obj
    finally:
        if not stdin:
            fh.close()


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(type(value), "a number")


def iter_complete(path: str | Path, skip_malformed: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, value)`` for each complete non-blank line of an output being appended to.

    A complete line is newline-terminated, or is the last line and valid JSON (a record whose
    final line break is missing, as in a file a user made). An unterminated last line that is
    not valid JSON is a torn tail (still being written, or left by a crash) and is passed
    over, and so is a file not created yet. A complete line that cannot be read raises
    RecordError, or is passed over when ``skip_malformed``. Values are not checked to be objects.
    """
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():
        raise CirkitError(f"{path}: is a folder, but a JSONL file is written here; choose a file path")
    if not path.is_file():  # a FIFO would block the read forever
        raise CirkitError(f"{path}: is not a regular file (a device, FIFO or socket); choose a file path")
    with open(path, "rb") as fh:
        for lineno, raw, terminated in _lines(fh):
            if raw is None:
                if not terminated:
                    return  # an overlong unterminated tail: torn
                if skip_malformed:
                    continue
                raise _too_long(path, lineno)
            if not raw.strip() or raw.strip() == _BOM:
                continue
            try:
                obj = _decode(raw, lineno)
            except _Malformed as e:
                if not terminated:
                    return  # the torn tail: only the last line can lack its newline
                if skip_malformed:
                    continue
                raise RecordError(path, lineno, str(e)) from None
            except _Refused as e:
                if skip_malformed:
                    continue
                raise RecordError(path, lineno, e.message, e.field) from None
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


def encode_record(obj: dict[str, Any], path: str | Path, key: str = "id") -> bytes:
    """One JSONL line (UTF-8, with its newline); a value JSON or UTF-8 cannot hold is a RecordError."""
    try:
        return (json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start:e.end] if isinstance(e.object, str) else ""
        raise RecordError(path, None, f"record {obj.get(key)!r} holds text that is not Unicode "
                                      f"({bad.encode('utf-8', 'backslashreplace').decode()}); it was not written") from None
    except ValueError as e:
        raise RecordError(path, None, f"record {obj.get(key)!r} cannot be written as JSON ({e})") from None


def write_jsonl(path: str | Path, records: Iterable[Record | dict], kind: str | None = None,
                owned: Any = None) -> int:
    """Write a whole JSONL file atomically; returns the number of records (``kind``/``owned``: see atomic_write)."""
    n = 0
    with atomic_write(path, "wb", kind=kind, owned=owned) as fh:
        for rec in records:
            fh.write(encode_record(rec.to_dict() if isinstance(rec, Record) else rec, path))
            n += 1
    return n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class JsonlAppender:
    """Append records one by one, so a killed job keeps what it finished.

    On open, an existing file is scanned and the ids already present are loaded, so a re-run
    skips them. Its last line, if it lacks the line break, is either a complete record (valid
    JSON: kept, the line break added) or a line torn by a crash mid-write (cut off, with a
    warning). Each record is one ``write`` of a full line, unbuffered, so after the process
    dies the file holds whole records plus at most one torn line.

    The caller holds the output's lock (:func:`cirkit.io.lock.output_lock`): one writer per file.

    ``-`` streams the records to standard output instead (one flushed line each, each id once in
    the run): there is nothing to resume, and the reader decides where they go.
    """

    def __init__(self, path: str | Path, key: str = "id", fsync: bool = False, record: type[Record] | None = None):
        self.path = Path(path)
        if record is not None:
            check_output_kind(self.path, record)
        self.key = key
        self.fsync = fsync
        self.done: set[str] = set()
        self.duplicates: list[tuple[str, int]] = []  # (id, line) of records repeating an earlier id
        self.written = 0
        self._fd = -1
        self.stream = is_stdio(self.path)
        if self.stream:
            return
        check_file_output(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._recover()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise CirkitError(f"{self.path}: cannot write here ({e.strerror}); choose another output path") from None

    def _recover(self) -> None:
        try:
            for lineno, obj in iter_complete(self.path):
                if not isinstance(obj, dict) or self.key not in obj:
                    raise RecordError(self.path, lineno, f"expected a JSON object with an {self.key!r}")
                key = str(obj[self.key])
                if key in self.done:
                    self.duplicates.append((key, lineno))
                self.done.add(key)
        except RecordError as e:
            why = str(e)[len(f"{e.path}:{e.line}: "):]
            raise RecordError(
                self.path, e.line, f"malformed line in an output being resumed ({why}); fix or delete the file"
            ) from None
        if self.duplicates:
            key, line = self.duplicates[0]
            log.warning("%s: %d records repeat an id already in the file (first: %r on line %d); "
                        "they are kept, but readers of this file will refuse them",
                        self.path, len(self.duplicates), key, line)
        self._repair_tail()

    def _tail_start(self) -> tuple[int, int]:
        """``(offset after the last line break, file size)``."""
        with open(self.path, "rb") as fh:
            end = pos = fh.seek(0, os.SEEK_END)
            while pos > 0:  # scan back from the end: the tail is at most one record long
                step = min(pos, 1 << 16)
                fh.seek(pos - step)
                nl = fh.read(step).rfind(b"\n")
                if nl != -1:
                    return pos - step + nl + 1, end
                pos -= step
        return 0, end

    def _repair_tail(self) -> None:
        """Terminate a complete last record that lacks its line break; cut a torn one."""
        start, end = self._tail_start()
        if start == end:
            return
        with open(self.path, "rb") as fh:
            fh.seek(start)
            tail = fh.read(min(end - start, MAX_LINE_BYTES + 1))
        body = tail[3:] if start == 0 and tail.startswith(_BOM) else tail
        if not body.strip():
            complete = True
        elif end - start > MAX_LINE_BYTES:
            complete = False
        else:
            try:
                _decode(tail, 1 if start == 0 else 2)
                complete = True
            except _Malformed:
                complete = False
            # _Refused cannot happen: iter_complete raised for a complete tail already
        if complete:
            with open(self.path, "ab") as fh:
                fh.write(b"\n")
            return
        if not body.lstrip().startswith(b"{"):
            raise RecordError(self.path, None, "the last line is incomplete and is not a record cut short by a "
                                               "crash; fix or remove it, then re-run")
        log.warning("%s: cut a torn last line (%d bytes) left by an interrupted write", self.path, end - start)
        with open(self.path, "r+b") as fh:
            fh.truncate(start)

    def __contains__(self, key: object) -> bool:
        return str(key) in self.done

    def write(self, record: Record | dict) -> bool:
        """Append one record unless its id is already present; returns whether it was written."""
        obj = record.to_dict() if isinstance(record, Record) else record
        key = str(obj[self.key])
        if key in self.done:
            return False
        line = encode_record(obj, self.path, self.key)
        if self.stream:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()  # a reader downstream sees each record as it finishes
            self.done.add(key)
            self.written += 1
            return True
        try:
            _write_all(self._fd, line)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as e:
            raise CirkitError(
                f"{self.path}: cannot append ({e.strerror}); the {len(self.done)} records already in it are kept, "
                "fix the cause and re-run the same command to resume"
            ) from None
        self.done.add(key)
        self.written += 1
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def loads(raw: bytes | str) -> Any:
    """``json.loads`` for the JSON files cirkit reads whole (configs, manifests, annotations).

    Nesting too deep for Python's parser is a ``JSONDecodeError`` like any other malformed
    file (its callers turn that into one line naming the file), not a RecursionError traceback.
    """
    try:
        return json.loads(raw)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to parse", raw if isinstance(raw, str) else "", 0) from None


def check_output_kind(path: str | Path, record: type[Record]) -> None:
    """Refuse to resume an existing output whose records are of another kind (its first record is checked).

    Appending captions to a gallery file, or results to a training file, would mix two files
    into one, and the ids already there would silently count as done.
    """
    if is_stdio(path):  # standard output: nothing there to resume
        return
    for lineno, obj in iter_complete(path):
        try:
            record.from_dict(obj, path, lineno)
        except RecordError as e:
            why = str(e)[len(f"{e.path}:{e.line}: "):]
            raise RecordError(path, lineno, f"{why}; so this is not a {record.kind} file to resume, "
                                            "write the output to a new file") from None
        return


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (the same inode when both exist, else the same absolute path)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(a) == os.path.abspath(b)


def check_not_input(output: str | Path, *inputs: str | Path | None) -> None:
    """Refuse an output that is one of the run's inputs: appending to what is being read mixes the two."""
    for inp in inputs:
        if inp is not None and str(inp) != "-" and same_file(output, inp):
            raise CirkitError(f"{output}: is also an input of this run ({inp}); write the output to another file")


MAX_JSON_BYTES = 1 << 30  # a whole JSON document read into memory (imports, annotation files)


def check_text(obj: Any, path: str | Path, line: int | None = None) -> None:
    """Refuse what a JSONL line may not hold (NUL, lone surrogates, deep nesting) in a value read elsewhere."""
    try:
        _check_values(obj)
    except _Refused as e:
        raise RecordError(path, line, e.message, e.field) from None


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A whole JSON file, under the same rules as a JSONL line; errors name the file and line."""
    path = Path(path)
    _check_readable(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CirkitError(f"{path}: {size} bytes is over the {max_bytes}-byte limit for a JSON file")
        raw = path.read_bytes()
    except OSError as e:
        raise CirkitError(f"{path}: cannot read ({e.strerror})") from None
    if raw.startswith(_BOM):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(path, raw.count(b"\n", 0, e.start) + 1, "not valid UTF-8: save the file as UTF-8") from None
    try:
        obj = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise RecordError(path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise RecordError(path, None, f"nested more than {MAX_DEPTH} levels deep") from None
    except _Refused as e:
        raise RecordError(path, None, e.message, e.field) from None
    except ValueError as e:
        raise RecordError(path, None, f"a value cannot be read ({str(e)[:80]})") from None
    check_text(obj, path)
    return obj
