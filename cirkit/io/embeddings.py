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

A store may live on object storage (``s3://bucket/gallery.lance``, with ``storage_options``:
:mod:`cirkit.io.storage`); it is then created by LanceDB directly (Lance's first commit is
what makes a table exist there, so there is no half-made state to rename away).

Several processes (``embed`` under ``accelerate launch``) write one store through Lance's
distributed write API: each process writes its rows as uncommitted fragments
(:func:`lance.fragment.write_fragments`, :class:`FragmentWriter`) and journals each fragment's
metadata in a small JSONL file on its own machine as soon as it is written; when all are done,
the main process commits every journaled fragment in one ``LanceOperation.Append``
(:func:`commit_fragments`). A killed process loses only the rows it had not flushed: the next
run (with any number of processes) first commits what the journals hold, skipping fragments
already committed (the commit may have landed before the journal was cleared), and only then
reads which ids are done.
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
from cirkit.io.storage import is_local, local_path, remote_key
from cirkit.records import EmbeddingManifest

log = logging.getLogger("cirkit")

MANIFEST_KEY = b"cirkit"
TABLE_ID_KEY = b"cirkit.table_id"  # on the id field: {"uuid": ...} written when an index table is created
ROW_COLUMNS = ("id", "image", "vector")
# The store's one column beyond the row schema: the image file's "<size>-<mtime_ns>" when it was
# embedded, so a re-run re-embeds a file that changed (null: not known, rows of older stores).
SIGNATURE = "file_sig"
# What a Lance dataset folder holds; a folder of only these and no committed version is a
# table cut off while being created.
LANCE_PARTS = frozenset({"_versions", "_transactions", "data", "_indices", "_deletions", "_refs"})


# -- locations -------------------------------------------------------------------------------
__all__ = ["EmbeddingStore", "FragmentWriter", "commit_fragments", "is_local", "local_path", "read_embeddings",
           "store_location"]


def store_location(path: str | Path) -> tuple[str, str]:
    """``(folder or URI, table name)`` of a store path; it must end in .lance and its name be a plain name."""
    from cirkit.io.atomic import check_name

    text = str(path)
    if not is_local(text):
        root, _, leaf = text.rstrip("/").rpartition("/")
        if not leaf.endswith(".lance") or leaf == ".lance" or root.endswith(":/"):
            raise CirkitError(f"{path}: an embeddings store URI must end in /NAME.lance (e.g. s3://bucket/gallery.lance)")
        check_name(leaf[: -len(".lance")], f"{path}: the embeddings store name")
        return root, leaf[: -len(".lance")]
    p = Path(path)
    if p.suffix != ".lance":
        raise CirkitError(f"{path}: an embeddings store path must end in .lance (e.g. gallery.lance)")
    check_name(p.stem, f"{path}: the embeddings store name")
    return str(p.parent if str(p.parent) else "."), p.stem


def file_signature(path: str | Path) -> str | None:
    """``"<size>-<mtime_ns>"`` of an image file (what make and rsync compare), None if it cannot be read
    (or is a dataset's image, with no file of its own)."""
    if not isinstance(path, (str, Path)):
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    return f"{st.st_size}-{st.st_mtime_ns}"


def connect(uri: str, storage_options: dict[str, str] | None = None):
    """``lancedb.connect`` with object-storage options (credentials from the environment when None)."""
    import lancedb

    return lancedb.connect(uri, storage_options=storage_options) if storage_options else lancedb.connect(uri)


# -- the row schema ----------------------------------------------------------------------------


def row_schema(manifest: EmbeddingManifest, columns: Sequence[Any] = (), table_id: str | None = None,
               kind: str = "index"):
    """id, image, vector[dim], then ``columns`` (Arrow fields); the manifest in the metadata.

    ``table_id``: the table's identity, kept on the ``id`` field with its ``kind`` (``index`` or
    ``store``), so neither is ever taken for the other.
    """
    import pyarrow as pa

    id_meta = {TABLE_ID_KEY: json.dumps({"uuid": table_id, "kind": kind})} if table_id is not None else None
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


def _table_identity(schema) -> dict[str, Any]:
    try:
        raw = (schema.field("id").metadata or {}).get(TABLE_ID_KEY)
        obj = json.loads(raw) if raw else None
    except (KeyError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def table_id_of(schema) -> str | None:
    """The identity uuid of a table (None for tables made before cirkit wrote one)."""
    uuid = _table_identity(schema).get("uuid")
    return str(uuid) if uuid else None


def table_kind_of(schema) -> str | None:
    """``index`` or ``store`` for a table with an identity (identities without a kind were an index's), else None."""
    ident = _table_identity(schema)
    return str(ident.get("kind") or "index") if ident.get("uuid") else None


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


def create_table(uri: str, name: str, schema, data=None, storage_options: dict[str, str] | None = None):
    """Create table ``name`` at ``uri``; a local one appears under its name only once committed.

    The table is written in a temp folder beside it (named with host and pid, removed by the
    next run if this process dies) and renamed into place: Lance keeps paths relative to the
    table folder, so the move is free.
    """
    import lancedb

    from cirkit.io.atomic import remove_dead_temps, temp_name

    if not is_local(uri):
        db = connect(uri, storage_options)
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


def _open(root: str, name: str, where: str, storage_options: dict[str, str] | None = None):
    try:
        return connect(root, storage_options).open_table(name)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        raise CirkitError(f"{where}: cannot open it as a Lance table ({str(e).splitlines()[0]}); "
                          f"re-create it with 'cirkit embed'") from None


def _column(table, name: str):
    """One column of a whole table, without reading the vectors."""
    return table.search().select([name]).limit(None).to_arrow().column(name)


# -- the store ------------------------------------------------------------------------------------


class EmbeddingStore:
    """Append-only, resumable store of normalised vectors (see module docstring)."""

    def __init__(self, path: str | Path, manifest: EmbeddingManifest, table, existing: set[str],
                 storage_options: dict[str, str] | None = None, signatures: dict[str, str | None] | None = None,
                 images: dict[str, str] | None = None):
        self.path, self.manifest, self._table, self.done = path, manifest, table, existing
        self.storage_options = storage_options
        self.signatures = signatures if signatures is not None else {}  # id -> file signature when embedded
        self.images = images if images is not None else {}  # id -> image path stored
        self._schema = table.schema  # the table's own (with its identity), so fragments match it exactly

    @property
    def identity(self) -> str:
        """What tells this store from one deleted and made again at the same path (journals name it)."""
        return table_id_of(self._table.schema) or "unrecorded"

    @property
    def uri(self) -> str:
        """The Lance dataset's own URI (``<folder>/<name>.lance``)."""
        return dataset_uri(self.path)

    @classmethod
    def open_for_append(cls, path: str | Path, manifest: EmbeddingManifest,
                        storage_options: dict[str, str] | None = None, create: bool = True) -> EmbeddingStore:
        """Open (or, with ``create``, create) a store; refuses to mix vectors from another model or dimension.

        Call it under ``output_lock(path)`` (``cirkit embed`` does): one writer at a time is
        what keeps ids unique.
        """
        root, name = store_location(path)
        if not is_local(path):
            return cls._open_remote(path, root, name, manifest, storage_options, create)
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise CirkitError(f"{path}: is a file, not an embeddings store; choose another path ending in .lance")
        if create:
            remove_uncommitted(p, "embeddings store")
        if p.exists():
            return cls._existing(path, _open(root, name, str(path)), manifest, None)
        if not create:
            raise CirkitError(f"{path}: no such embeddings store (make one with 'cirkit embed')")
        table = create_table(root, name, _new_schema(manifest))
        return cls(path, manifest, table, set())

    @classmethod
    def _open_remote(cls, path, root: str, name: str, manifest, storage_options, create: bool) -> EmbeddingStore:
        db = connect(root, storage_options)
        if name in table_names(db):
            return cls._existing(path, _open(root, name, str(path), storage_options), manifest, storage_options)
        if not create:
            raise CirkitError(f"{path}: no such embeddings store (make one with 'cirkit embed')")
        table = create_table(root, name, _new_schema(manifest), storage_options=storage_options)
        return cls(path, manifest, table, set(), storage_options)

    @classmethod
    def _existing(cls, path, table, manifest, storage_options) -> EmbeddingStore:
        if table_kind_of(table.schema) == "index":  # rows added here would bypass the index's updates
            raise CirkitError(f"{path}: is a table of an index made by 'cirkit index', not an embeddings store; "
                              "embed into a new NAME.lance and index that")
        have = read_manifest_from_schema(table.schema, str(path))
        check_rows_schema(table.schema, have.dim, str(path))
        if have.fingerprint() != manifest.fingerprint():
            raise CirkitError(
                f"{path}: holds vectors from {have.backbone} {have.checkpoint} (dim {have.dim}), "
                f"not {manifest.backbone} {manifest.checkpoint} (dim {manifest.dim}); write to a new file"
            )
        if SIGNATURE not in table.schema.names:  # a store from before signatures: they start unknown
            table.add_columns({SIGNATURE: "CAST(NULL AS string)"})
        rows = table.search().select(["id", "image", SIGNATURE]).limit(None).to_arrow().to_pydict()
        return cls(path, have, table, set(rows["id"]), storage_options,
                   dict(zip(rows["id"], rows[SIGNATURE], strict=True)), dict(zip(rows["id"], rows["image"], strict=True)))

    def stale(self, items: Sequence[tuple[str, Path]]) -> list[str]:
        """Ids of ``items`` stored from another file, or from a file that changed since it was embedded."""
        out = []
        for key, p in items:
            if key not in self.done or not isinstance(p, (str, Path)):  # a dataset's image: ids name it for good
                continue
            sig = self.signatures.get(key)
            if not self._same_image(self.images.get(key), p) or (sig is not None and sig != file_signature(p)):
                out.append(key)
        return out

    def _same_image(self, stored: str | None, path: Path) -> bool:
        if stored is None:
            return False
        if "://" in stored or not is_local(self.path):
            return stored == str(path)
        where = Path(stored) if Path(stored).is_absolute() else Path(self.path).parent / stored  # as the index reads it
        return where.resolve() == Path(path).resolve()

    def remove(self, ids: Sequence[str]) -> int:
        """Delete these ids' rows (one commit per 1000 ids); returns how many were stored."""
        gone = [k for k in dict.fromkeys(ids) if k in self.done]
        for s in range(0, len(gone), 1000):
            chunk = gone[s : s + 1000]
            self._table.delete("id IN (" + ", ".join("'" + k.replace("'", "''") + "'" for k in chunk) + ")")
            self.done.difference_update(chunk)
            for k in chunk:
                self.signatures.pop(k, None)
                self.images.pop(k, None)
        return len(gone)

    def record_signatures(self, items: Sequence[tuple[str, Path]]) -> int:
        """Fill in unknown signatures (rows of older stores) from the files as they are now."""
        todo = [(k, file_signature(p)) for k, p in items if k in self.done and self.signatures.get(k) is None]
        todo = [(k, s) for k, s in todo if s is not None]
        if not todo:
            return 0
        import pyarrow as pa

        src = pa.table({"id": pa.array([k for k, _ in todo], pa.string()),
                        SIGNATURE: pa.array([s for _, s in todo], pa.string())})
        self._table.merge_insert("id").when_matched_update_all().execute(src)
        self.signatures.update(todo)
        return len(todo)

    def _new_rows(self, ids: Sequence[str], images: Sequence[str], vectors, mark: bool = True):
        """The Arrow rows of ``ids`` that are new to the store and to this batch, with their image
        files' signatures (None: nothing new). ``mark``: count them as stored now (else see :meth:`_mark`)."""
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
            return None
        import pyarrow as pa

        sigs = [file_signature(images[i]) if is_local(images[i] or "") else None for i in keep]
        columns = {SIGNATURE: pa.array(sigs, pa.string())} if SIGNATURE in self._schema.names else None
        rows = rows_table([ids[i] for i in keep], [images[i] for i in keep], vectors[keep], self._schema, columns)
        if mark:
            self._mark(rows)
        return rows

    def _mark(self, rows) -> None:
        """Count ``rows`` as stored (their ids done, their images and signatures known)."""
        data = rows.select([c for c in ("id", "image", SIGNATURE) if c in rows.column_names]).to_pydict()
        sigs = data.get(SIGNATURE) or [None] * len(data["id"])
        self.done.update(data["id"])
        for key, image, sig in zip(data["id"], data["image"], sigs, strict=True):
            self.signatures[key], self.images[key] = sig, image

    def append(self, ids: Sequence[str], images: Sequence[str], vectors) -> int:
        """Add the rows whose ids are new (one Lance commit); returns how many were added.

        Ids count as stored only once the commit is done: a failed first write leaves the store empty.
        """
        rows = self._new_rows(ids, images, vectors, mark=False)
        if rows is None:
            return 0
        self._table.add(rows)
        self._mark(rows)
        return rows.num_rows


def _new_schema(manifest: EmbeddingManifest):
    """A new store's schema: the row schema, the file signatures, and an identity marked as a store's."""
    import uuid

    import pyarrow as pa

    return row_schema(manifest, [pa.field(SIGNATURE, pa.string())], table_id=uuid.uuid4().hex, kind="store")


def table_names(db) -> list[str]:
    listed = db.list_tables()
    return list(getattr(listed, "tables", listed))


def dataset_uri(path: str | Path) -> str:
    """The Lance dataset URI of a store path (a local folder as an absolute path)."""
    return str(path).rstrip("/") if not is_local(path) else str(local_path(path).resolve())


# -- several writers, one commit ---------------------------------------------------------------------
JOURNAL_SUFFIX = ".fragments"


def journal_dir(path: str | Path) -> Path:
    """Where this machine's processes journal the fragments they wrote into the store at ``path``.

    Beside a local store (``.<name>.lance.fragments``); for a remote store, in the local cache.
    """
    from cirkit.io.storage import cache_root

    if is_local(path):
        p = local_path(path)
        return p.parent / f".{p.name}{JOURNAL_SUFFIX}"
    return cache_root() / "remote" / remote_key(str(path)) / f"store{JOURNAL_SUFFIX}"


class FragmentWriter:
    """One process's rows written into a store as uncommitted Lance fragments, journaled on its machine.

    Rows are buffered and written ``rows_per_fragment`` at a time
    (:func:`lance.fragment.write_fragments`); each fragment's metadata is appended to this
    process's journal file (one JSON line, fsynced) right after its data files are complete,
    so a kill loses at most the rows still buffered. :func:`commit_fragments` makes them part
    of the table.
    """

    def __init__(self, store: EmbeddingStore, rank: int, rows_per_fragment: int = 8192):
        import socket

        self.store, self.rows_per_fragment = store, max(1, int(rows_per_fragment))
        folder = journal_dir(store.path)
        folder.mkdir(parents=True, exist_ok=True)
        # host + pid in the name: ranks of several machines sharing one folder never share a file
        self.journal = folder / f"rank-{rank}-{socket.gethostname()}-{os.getpid()}.jsonl"
        self._pending: list[Any] = []
        self._rows = 0
        self.written = 0

    def append(self, ids: Sequence[str], images: Sequence[str], vectors) -> int:
        rows = self.store._new_rows(ids, images, vectors)
        if rows is None:
            return 0
        self._pending.append(rows)
        self._rows += rows.num_rows
        if self._rows >= self.rows_per_fragment:
            self.flush()
        return rows.num_rows

    def flush(self) -> None:
        import pyarrow as pa
        from lance.fragment import write_fragments

        if not self._pending:
            return
        data = pa.concat_tables(self._pending)
        frags = write_fragments(data, self.store.uri, schema=self.store._schema, mode="append",
                                max_rows_per_file=max(len(data), 1), storage_options=self.store.storage_options)
        lines = "".join(json.dumps({"fragment": f.to_json(), "rows": f.physical_rows, "table": self.store.identity})
                        + "\n" for f in frags)
        with open(self.journal, "a", encoding="utf-8") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())
        self.written += len(data)
        self._pending, self._rows = [], 0

    def close(self) -> None:
        self.flush()


def journal_entries(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(journal file, entry)`` of every fragment journaled on this machine for the store at ``path``.

    A torn last line (a kill while it was written) is passed over: its fragment was never
    recorded, so its rows are simply embedded again.
    """
    folder = journal_dir(path)
    if not folder.is_dir():
        return []
    out = []
    for f in sorted(folder.glob("rank-*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("fragment"), dict):
                out.append((str(f), entry))
    return out


def clear_journal(files: Sequence[str]) -> None:
    """Remove journal files whose fragments are committed."""
    for f in set(files):
        Path(f).unlink(missing_ok=True)
    for folder in {Path(f).parent for f in files}:
        try:
            folder.rmdir()  # only when empty: another machine's or a live run's journals stay
        except OSError:
            pass


def commit_fragments(store: EmbeddingStore, entries: Sequence[dict[str, Any]]) -> int:
    """Commit the journaled fragments not yet in the table, in one ``LanceOperation.Append``; returns their rows.

    A fragment whose data file the table already references was committed by an earlier run
    that died before clearing its journal: it is left out, so no row is ever added twice. A
    fragment journaled for another table (the store was deleted and made again at this path)
    is left out too: its data files went with the old table.
    """
    import lance
    from lance.fragment import FragmentMetadata

    if not entries:
        return 0
    ds = lance.dataset(store.uri, storage_options=store.storage_options)
    committed = {df.path for frag in ds.get_fragments() for df in frag.metadata.files}
    new, seen = [], set()
    other = [e for e in entries if e.get("table", store.identity) != store.identity]
    if other:
        log.warning("%s: leaving out %d fragments journaled for an earlier table at this path", store.path, len(other))
    for e in entries:
        if e.get("table", store.identity) != store.identity:
            continue
        files = [f["path"] for f in e["fragment"].get("files", [])]
        if not files or any(f in committed or f in seen for f in files):
            continue
        seen.update(files)
        new.append(FragmentMetadata.from_json(json.dumps(e["fragment"])))
    if not new:
        return 0
    lance.LanceDataset.commit(store.uri, lance.LanceOperation.Append(new), read_version=ds.version,
                              storage_options=store.storage_options)
    store._table.checkout_latest()
    return sum(f.physical_rows for f in new)


def read_embeddings(path: str | Path, storage_options: dict[str, str] | None = None,
                    ) -> tuple[EmbeddingManifest, list[str], list[str], np.ndarray]:
    """Load a whole store: manifest, ids, image paths, and an (N, dim) float32 matrix.

    A store with null or duplicate ids or null vectors is refused in one line.
    """
    root, name = store_location(path)
    if not is_local(path):
        if name not in table_names(connect(root, storage_options)):
            raise CirkitError(f"{path}: no such embeddings store (make one with 'cirkit embed')")
        table = _open(root, name, str(path), storage_options)
        return _read_table(table, path)
    p = Path(path)
    if not p.exists():
        raise CirkitError(f"{path}: no such embeddings store (make one with 'cirkit embed')")
    if not p.is_dir():
        raise CirkitError(f"{path}: is a file, not an embeddings store (make one with 'cirkit embed')")
    if not is_committed(p):
        raise CirkitError(f"{path}: has no committed version (an embed run was cut off while creating it); "
                          f"re-run 'cirkit embed' to build it")
    return _read_table(_open(root, name, str(path)), path)


def _read_table(table, path) -> tuple[EmbeddingManifest, list[str], list[str], np.ndarray]:
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
