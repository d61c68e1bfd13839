"""The Lance row schema shared by the embeddings store and the index, and the store itself.

A row is ``id`` (string, unique), ``image`` (string), ``vector``
(fixed_size_list<float32>[dim]), then, in an index, the user's metadata columns
(:func:`row_schema`, :func:`rows_table`: the one place that lays rows out). The manifest
(:class:`cirkit.records.EmbeddingManifest`) lives in the table's schema metadata under the
key ``cirkit``, so it can never drift from the vectors.

The store is ``<name>.lance``. Appends are Lance commits (atomic per batch), so a killed
``embed`` keeps every finished batch and a re-run skips the ids already stored. A new table
is built under a temp name and renamed into place once its first version is committed
(:func:`create_table`), so a kill during creation leaves no half-made table under the real
name; a half-made one left by an older cirkit (a Lance folder with no committed version) is
recognised and rebuilt. Writers hold :func:`cirkit.io.lock.output_lock` on the store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cirkit.errors import CirkitError
from cirkit.records import EmbeddingManifest

log = logging.getLogger("cirkit")

MANIFEST_KEY = b"cirkit"
TABLE_ID_KEY = b"cirkit.table_id"  # on the id field: {"uuid": ...} written when an index table is created
ROW_COLUMNS = ("id", "image", "vector")
# What a Lance dataset folder holds; a folder of only these and no committed version is a
# table cut off while being created.
LANCE_PARTS = frozenset({"_versions", "_transactions", "data", "_indices", "_deletions", "_refs"})


# -- locations -------------------------------------------------------------------------------


def is_local(uri: str | Path) -> bool:
    """Whether a LanceDB URI is a local folder (a plain path or ``file://``)."""
    return "://" not in str(uri) or str(uri).startswith("file://")


def local_path(uri: str | Path) -> Path:
    return Path(str(uri)[len("file://"):] if str(uri).startswith("file://") else str(uri)).expanduser()


def store_location(path: str | Path) -> tuple[str, str]:
    """``(folder, table name)`` of a store path; it must end in .lance and its name be a plain name."""
    from cirkit.io.atomic import check_name

    p = Path(path)
    if p.suffix != ".lance":
        raise CirkitError(f"{path}: an embeddings store path must end in .lance (e.g. gallery.lance)")
    check_name(p.stem, f"{path}: the embeddings store name")
    return str(p.parent if str(p.parent) else "."), p.stem


# -- the row schema ----------------------------------------------------------------------------


def row_schema(manifest: EmbeddingManifest, columns: Sequence[Any] = (), table_id: str | None = None):
    """id, image, vector[dim], then ``columns`` (Arrow fields); the manifest in the metadata."""
    import pyarrow as pa

    id_meta = {TABLE_ID_KEY: json.dumps({"uuid": table_id})} if table_id is not None else None
    fields = [pa.field("id", pa.string(), metadata=id_meta), pa.field("image", pa.string()),
              pa.field("vector", pa.list_(pa.float32(), manifest.dim)), *columns]
    return pa.schema(fields, metadata={MANIFEST_KEY: json.dumps(manifest.to_dict())})


def rows_table(ids: Sequence[str], images: Sequence[str | None], vectors, schema, columns: dict[str, Any] | None = None):
    """The Arrow table of rows in ``schema``'s layout (``columns``: its metadata arrays by name)."""
    import pyarrow as pa

    dim = schema.field("vector").type.list_size
    vec = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), dim)
    arrays = {
        "id": pa.array(list(ids), pa.string()),
        "image": pa.array(list(images), pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel(), pa.float32()), dim),
        **(columns or {}),
    }
    return pa.table([arrays[f.name] for f in schema], schema=schema)


def read_manifest_from_schema(schema, where: str, made_by: str = "embed") -> EmbeddingManifest:
    """The manifest kept in a Lance schema's metadata (stores by ``cirkit embed``, indexes by ``cirkit index``)."""
    meta = schema.metadata or {}
    if MANIFEST_KEY not in meta:
        raise CirkitError(f"{where}: no cirkit manifest; was it written by 'cirkit {made_by}'?")
    try:
        from cirkit.io.jsonl import loads

        obj = loads(meta[MANIFEST_KEY])
    except ValueError as e:
        raise CirkitError(f"{where}: its cirkit manifest is not valid JSON ({e}); "
                          f"re-create it with 'cirkit {made_by}'") from None
    m = EmbeddingManifest.from_dict(obj, f"{where} (manifest)")
    if m.dim < 1:
        raise CirkitError(f"{where}: its cirkit manifest has dim {m.dim}; re-create it with 'cirkit {made_by}'")
    return m


def table_id_of(schema) -> str | None:
    """The identity uuid of an index table (None for tables made before cirkit wrote one)."""
    try:
        raw = (schema.field("id").metadata or {}).get(TABLE_ID_KEY)
        obj = json.loads(raw) if raw else None
    except (KeyError, ValueError):
        return None
    uuid = obj.get("uuid") if isinstance(obj, dict) else None
    return str(uuid) if uuid else None


def check_rows_schema(schema, dim: int, where: str, made_by: str = "embed") -> None:
    """Refuse a table whose id/image/vector columns are missing or of another type, in one line."""
    import pyarrow as pa

    want = {"id": "string", "image": "string", "vector": f"fixed_size_list<float>[{dim}]"}
    for name, wanted in want.items():
        if name not in schema.names:
            raise CirkitError(f"{where}: has no {name!r} column, so it is not a cirkit table; "
                              f"re-create it with 'cirkit {made_by}'")
        t = schema.field(name).type
        ok = (pa.types.is_string(t) or pa.types.is_large_string(t)) if name != "vector" else (
            pa.types.is_fixed_size_list(t) and t.list_size == dim and pa.types.is_float32(t.value_type))
        if not ok:
            raise CirkitError(f"{where}: column {name!r} is {t}, expected {wanted}; "
                              f"re-create it with 'cirkit {made_by}'")


# -- creating tables -----------------------------------------------------------------------------


def is_committed(folder: Path) -> bool:
    """Whether a local Lance table folder has at least one committed version."""
    return any((folder / "_versions").glob("*.manifest"))


def remove_uncommitted(folder: Path, what: str) -> bool:
    """Remove a Lance folder cut off before its first commit (call under the output's lock).

    Only a folder holding nothing but Lance's own parts is removed; anything else there is
    the user's, and is refused in one line. Returns whether a folder was removed.
    """
    if not folder.is_dir() or folder.is_symlink() or is_committed(folder):
        return False
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in LANCE_PARTS)
    if foreign:
        raise CirkitError(f"{folder}: is not a Lance table (it holds {', '.join(foreign[:3])}); "
                          f"choose another path for the {what}")
    log.warning("%s: removing a %s cut off before its first commit; building it again", folder, what)
    shutil.rmtree(folder)
    return True


def create_table(uri: str, name: str, schema, data=None):
    """Create table ``name`` at ``uri``; a local one appears under its name only once committed.

    The table is written in a temp folder beside it (named with host and pid, removed by the
    next run if this process dies) and renamed into place: Lance keeps paths relative to the
    table folder, so the move is free.
    """
    import lancedb

    from cirkit.io.atomic import remove_dead_temps, temp_name

    if not is_local(uri):
        db = lancedb.connect(uri)
        return db.create_table(name, data=data) if data is not None else db.create_table(name, schema=schema)
    final = local_path(uri) / f"{name}.lance"
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(final)
    tmp = temp_name(final)
    tmp.mkdir()
    try:
        db = lancedb.connect(str(tmp))
        db.create_table(name, data=data) if data is not None else db.create_table(name, schema=schema)
        os.rename(tmp / f"{name}.lance", final)  # fails if someone made a non-empty folder here meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lancedb.connect(str(local_path(uri))).open_table(name)


def _open(root: str, name: str, where: str):
    import lancedb

    try:
        return lancedb.connect(root).open_table(name)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        raise CirkitError(f"{where}: cannot open it as a Lance table ({str(e).splitlines()[0]}); "
                          f"re-create it with 'cirkit embed'") from None


def _column(table, name: str):
    """One column of a whole table, without reading the vectors."""
    return table.search().select([name]).limit(None).to_arrow().column(name)


# -- the store ------------------------------------------------------------------------------------


class EmbeddingStore:
    """Append-only, resumable store of normalised vectors (see module docstring)."""

    def __init__(self, path: str | Path, manifest: EmbeddingManifest, table, existing: set[str]):
        self.path, self.manifest, self._table, self.done = Path(path), manifest, table, existing
        self._schema = row_schema(manifest)

    @classmethod
    def open_for_append(cls, path: str | Path, manifest: EmbeddingManifest) -> EmbeddingStore:
        """Open (or create) a store; refuses to mix vectors from another model or dimension.

        Call it under ``output_lock(path)`` (``cirkit embed`` does): one writer at a time is
        what keeps ids unique.
        """
        root, name = store_location(path)
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise CirkitError(f"{path}: is a file, not an embeddings store; choose another path ending in .lance")
        remove_uncommitted(p, "embeddings store")
        if p.exists():
            table = _open(root, name, str(path))
            if table_id_of(table.schema) is not None:  # rows added here would bypass the index's updates
                raise CirkitError(f"{path}: is a table of an index made by 'cirkit index', not an embeddings store; "
                                  "embed into a new NAME.lance and index that")
            have = read_manifest_from_schema(table.schema, str(path))
            check_rows_schema(table.schema, have.dim, str(path))
            if have.fingerprint() != manifest.fingerprint():
                raise CirkitError(
                    f"{path}: holds vectors from {have.backbone} {have.checkpoint} (dim {have.dim}), "
                    f"not {manifest.backbone} {manifest.checkpoint} (dim {manifest.dim}); write to a new file"
                )
            return cls(path, have, table, set(_column(table, "id").to_pylist()))
        table = create_table(root, name, row_schema(manifest))
        return cls(path, manifest, table, set())

    def append(self, ids: Sequence[str], images: Sequence[str], vectors) -> int:
        """Add the rows whose ids are new; returns how many were added."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.manifest.dim:
            raise CirkitError(f"{self.path}: vectors of shape {vectors.shape} do not match dim {self.manifest.dim}")
        seen: set[str] = set()
        keep = []
        for i, k in enumerate(ids):  # new to the store and to this batch
            if k not in self.done and k not in seen:
                seen.add(k)
                keep.append(i)
        if not keep:
            return 0
        self._table.add(rows_table([ids[i] for i in keep], [images[i] for i in keep], vectors[keep], self._schema))
        self.done.update(seen)
        return len(keep)


def read_embeddings(path: str | Path) -> tuple[EmbeddingManifest, list[str], list[str], np.ndarray]:
    """Load a whole store: manifest, ids, image paths, and an (N, dim) float32 matrix.

    A store with null or duplicate ids or null vectors is refused in one line.
    """
    p = Path(path)
    if not p.exists():
        raise CirkitError(f"{path}: no such embeddings store (make one with 'cirkit embed')")
    root, name = store_location(path)
    if not p.is_dir():
        raise CirkitError(f"{path}: is a file, not an embeddings store (make one with 'cirkit embed')")
    if not is_committed(p):
        raise CirkitError(f"{path}: has no committed version (an embed run was cut off while creating it); "
                          f"re-run 'cirkit embed' to build it")
    table = _open(root, name, str(path))
    manifest = read_manifest_from_schema(table.schema, str(path))
    check_rows_schema(table.schema, manifest.dim, str(path))
    data = table.to_arrow()
    idcol, vcol = data.column("id"), data.column("vector")
    if idcol.null_count:
        raise CirkitError(f"{path}: {idcol.null_count} rows have no id; re-embed into a new store")
    ids = idcol.to_pylist()
    flat = vcol.combine_chunks()
    if vcol.null_count or (len(flat) and flat.values.null_count):
        bad = next(i for i, v in zip(ids, vcol.to_pylist(), strict=True) if v is None or None in v)
        raise CirkitError(f"{path}: row {bad!r} has a null vector; re-embed into a new store")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise CirkitError(f"{path}: id {dup!r} is stored more than once (two writers at once?); "
                          f"re-embed into a new store")
    images = data.column("image").to_pylist()
    vectors = flat.values.to_numpy(zero_copy_only=False).reshape(len(ids), manifest.dim) if ids else np.zeros((0, manifest.dim), np.float32)
    return manifest, ids, images, vectors.astype(np.float32, copy=False)
