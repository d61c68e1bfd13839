"""The record formats every stage reads and writes, defined once.

| file                         | record           | written by                 |
|------------------------------|------------------|----------------------------|
| ``captions.jsonl``           | :class:`Caption` | ``caption``, ``synth``     |
| ``triplets.jsonl``           | :class:`Triplet` | ``reformulate``, ``synth`` |
| ``gallery.jsonl``            | :class:`GalleryItem` | ``synth``, users       |
| ``queries.jsonl``            | :class:`Query`   | ``synth``, users           |
| ``results.jsonl``            | :class:`Result`  | ``query``                  |
| ``<name>.lance`` + manifest  | :class:`EmbeddingManifest` | ``embed``        |

Image paths stored in a JSONL file are resolved relative to the folder of that file
(absolute paths are kept). Unknown fields are kept in ``extra`` and written back, so a
user's own metadata survives every stage.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cirkit.errors import RecordError


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "").replace("NoneType", "null")
    return getattr(tp, "__name__", str(tp))


@dataclass
class Record:
    """Base: typed fields, validation with file:line, unknown fields kept in ``extra``."""

    kind: ClassVar[str] = "record"
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, kw_only=True)

    @classmethod
    def from_dict(cls, obj: Any, path: str | Path = "<memory>", line: int | None = None):
        """Validate ``obj`` against this schema; errors name the file, line and field."""
        if not isinstance(obj, dict):
            raise RecordError(path, line, f"expected a JSON object for a {cls.kind} record, got {type(obj).__name__}")
        hints = typing.get_type_hints(cls)
        values, extra = {}, {}
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        for key, value in obj.items():
            if key in fields:
                values[key] = value
            else:
                extra[key] = value
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if name not in values:
                if required:
                    raise RecordError(path, line, f"missing (a {cls.kind} record needs {', '.join(cls.required())})", name)
                continue
            if not _type_ok(values[name], hints[name]):
                raise RecordError(
                    path, line, f"expected {_type_name(hints[name])}, got {type(values[name]).__name__} {values[name]!r:.60}", name
                )
        rec = cls(**values, extra=extra)
        rec.validate(path, line)
        return rec

    @classmethod
    def required(cls) -> list[str]:
        return [
            f.name
            for f in dataclasses.fields(cls)
            if f.name != "extra" and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]

    def validate(self, path: str | Path, line: int | None) -> None:
        """Checks beyond types; subclasses raise :class:`RecordError`."""

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None or k in self.required()}
        out.update(self.extra)
        return out

    @property
    def key(self) -> str:
        """The value that identifies this record for resume/dedup."""
        return self.id  # type: ignore[attr-defined]


def _nonempty(rec: Record, name: str, path, line) -> None:
    if not str(getattr(rec, name)).strip():
        raise RecordError(path, line, "must not be empty", name)


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: str) -> bool:
    """``http://``, ``https://``, ``s3://``, ``file://``...: not a path relative to the file's folder."""
    return bool(_URL.match(value))


def _local(rec: Record, name: str, path, line) -> None:
    """An image field must name a local file: a URL would become a bogus path under the file's folder."""
    value = getattr(rec, name)
    if isinstance(value, str) and is_url(value):
        raise RecordError(path, line, f"{value[:80]!r} is a URL; cirkit reads images from local files, so download "
                                      "them and list their paths (relative to this file's folder, or absolute)", name)


@dataclass
class Caption(Record):
    """One line of ``captions.jsonl``: an image and its description."""

    kind: ClassVar[str] = "caption"
    id: str
    image: str
    caption: str
    model: str = "unknown"
    prompt: str | None = None
    settings: dict | None = None
    group: str | None = None

    def validate(self, path, line):
        _nonempty(self, "id", path, line)
        _nonempty(self, "image", path, line)
        _local(self, "image", path, line)


@dataclass
class Triplet(Record):
    """One line of ``triplets.jsonl``: (reference image, instruction) -> target image."""

    kind: ClassVar[str] = "triplet"
    id: str
    reference: str
    instruction: str
    target: str
    reference_caption: str | None = None
    target_caption: str | None = None
    source: str = "unknown"
    generator: dict | None = None

    def validate(self, path, line):
        for name in ("id", "reference", "target", "instruction"):
            _nonempty(self, name, path, line)
        _local(self, "reference", path, line)
        _local(self, "target", path, line)


_EDGE_OR_DOUBLE_UNDERSCORE = re.compile(r"^_|_$|_(?=_)|(?<=_)_")


def _id_part(part: str) -> str:
    # "%" is the escape character; an "_" that touches another "_" or an end of the part
    # becomes "%5F", so a part never contains "__" nor starts or ends with "_".
    return _EDGE_OR_DOUBLE_UNDERSCORE.sub("%5F", part.replace("%", "%25"))


def triplet_id(reference_id: str, target_id: str) -> str:
    """The id of the triplet (reference -> target): ``<reference id>__<target id>``, never ambiguous.

    Ids are joined with ``__``; within each, ``%`` and any ``_`` next to another ``_`` or at
    an end are percent-escaped, so the first ``__`` of the result is always the separator and
    two different pairs never share an id (``a`` + ``b__c`` -> ``a__b%5F%5Fc``, ``a__b`` + ``c``
    -> ``a%5F%5Fb__c``). Ids without those characters read as before: ``shoes/im_1__shoes/im_2``.
    """
    return f"{_id_part(reference_id)}__{_id_part(target_id)}"


@dataclass
class GalleryItem(Record):
    """One line of ``gallery.jsonl`` in the generic benchmark format."""

    kind: ClassVar[str] = "gallery"
    id: str
    image: str

    def validate(self, path, line):
        _nonempty(self, "id", path, line)
        _nonempty(self, "image", path, line)
        _local(self, "image", path, line)


@dataclass
class Query(Record):
    """One line of ``queries.jsonl``: a composed query and its ground-truth gallery ids.

    ``reference`` is an image path (or None for a text-only query), ``text`` the
    modification (or None for an image-only query). ``candidates`` restricts the ranking
    to a per-query gallery (GeneCIS); ``subset`` is a group for Recall_subset (CIRR).
    """

    kind: ClassVar[str] = "query"
    id: str
    reference: str | None = None
    text: str | None = None
    targets: list[str] = field(default_factory=list)
    reference_id: str | None = None
    candidates: list[str] | None = None
    subset: list[str] | None = None

    def validate(self, path, line):
        _nonempty(self, "id", path, line)
        if self.reference is None and not (self.text or "").strip():
            raise RecordError(path, line, "a query needs a reference image, a text, or both", "text")
        _local(self, "reference", path, line)


def jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold as text (dates, bytes, decimals from a table), and NaN/inf as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN: json.dumps would write a token other tools reject
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


@dataclass
class Hit(Record):
    """One ranked answer: a gallery image, its score, and the index's metadata columns for it.

    ``metadata`` holds the user's columns of the index row (empty when the index has none).
    """

    kind: ClassVar[str] = "hit"
    rank: int
    id: str
    score: float
    image: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def validate(self, path, line):
        if self.rank < 1:
            raise RecordError(path, line, f"must be at least 1, got {self.rank}", "rank")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "id": self.id, "score": round(float(self.score), 6),
                               "image": self.image}
        if self.metadata:
            out["metadata"] = jsonable(self.metadata)
        out.update(self.extra)
        return out


@dataclass
class Result(Record):
    """One line of ``results.jsonl``: the ranked answer to one query (hits best first)."""

    kind: ClassVar[str] = "result"
    id: str
    hits: list[Hit]
    reference: str | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        # hits given as plain dicts (a rankings writer, an old caller) become records here
        self.hits = [h if isinstance(h, Hit) else Hit.from_dict(h) for h in self.hits]

    @classmethod
    def from_dict(cls, obj: Any, path: str | Path = "<memory>", line: int | None = None):
        """As :meth:`Record.from_dict`; a bad hit is named by its position (``hits[2].score``)."""
        if isinstance(obj, dict) and isinstance(obj.get("hits"), list):
            hits = []
            for i, h in enumerate(obj["hits"]):
                try:
                    hits.append(h if isinstance(h, Hit) else Hit.from_dict(h, path, line))
                except RecordError as e:
                    where = f"{path}:{line}" if line is not None else f"{path}"
                    prefix = f"{where}: " + (f"field '{e.field}': " if e.field else "")
                    field_name = f"hits[{i}]" + (f".{e.field}" if e.field else "")
                    raise RecordError(path, line, str(e).removeprefix(prefix), field_name) from None
            obj = {**obj, "hits": hits}
        return super().from_dict(obj, path, line)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["hits"] = [h.to_dict() for h in self.hits]
        return out


@dataclass
class EmbeddingManifest(Record):
    """What produced the vectors in an embeddings store or index (stored beside them)."""

    kind: ClassVar[str] = "manifest"
    backbone: str
    checkpoint: str                 # identity: model name or folder name @ weights id / pretrained tag
    dim: int
    normalized: bool = True
    mode: str = "image"
    count: int | None = None
    dtype: str = "float32"
    source: str | None = None       # where to load the model from: absolute folder, hub id or open_clip name
    pretrained: str | None = None   # open_clip pretrained tag or weights file, if any

    def fingerprint(self) -> tuple[str, str, int]:
        """The fields that must match between an index and the model that queries it."""
        return (self.backbone, self.checkpoint, self.dim)


def output_dir(output: str | Path) -> Path | None:
    """The folder paths written into ``output`` are relative to; None for ``-`` (stdout: absolute paths)."""
    return None if str(output) == "-" else Path(output).parent.resolve()


def resolve_path(value: str, base_dir: str | Path) -> Path:
    """Resolve an image path from a JSONL record relative to that file's folder."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def relative_path(path: str | Path, base_dir: str | Path | None) -> str:
    """``path`` as written in a JSONL file in ``base_dir``: relative to it, the inverse of :func:`resolve_path`.

    Both sides are resolved first: a ``..`` after a symlinked folder climbs from the link's
    target when the OS opens the path, so a purely textual relative path could point
    elsewhere. Across Windows drives, where no relative path exists, the absolute path.
    ``base_dir`` None (records streamed to stdout: no file, no folder): the absolute path.
    """
    p = Path(path).resolve()
    if base_dir is None:
        return str(p)
    try:
        return os.path.relpath(p, Path(base_dir).resolve())
    except ValueError:  # different drives on Windows
        return str(p)


RECORD_TYPES: dict[str, type[Record]] = {
    c.kind: c for c in (Caption, Triplet, GalleryItem, Query, Hit, Result, EmbeddingManifest)
}
