"""``cirkit index``: build and update a persistent LanceDB index from an embeddings store.

This module writes; :mod:`cirkit.search` reads (the layout is described there). A run
upserts rows by id (nothing is written when nothing changed), deletes ids, adds metadata
columns, and builds, refreshes or drops the ANN index as the row count and flags ask,
recording the parameters it built with in the table so search derives ``nprobes`` from
them.

Safety: one writer per table (:func:`cirkit.io.lock.output_lock` on the table; a second
run fails at once naming the holder, or waits with ``wait``); a new table is written under a
temp name and renamed into place once committed; the table name must be a plain name (it
becomes a folder), and the index may not be one of its own inputs.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cirkit.config import UsageError, check_settings, setting, wait_setting
from cirkit.errors import CirkitError, RecordError
from cirkit.io.storage import storage_options_setting
from cirkit.records import EmbeddingManifest
from cirkit.search import (
    ANN_KEY,
    DEFAULT_TABLE,
    RESERVED,
    Index,
    ann_params,
    field_meta,
    lock_target,
)
from cirkit.summary import StageResult, timed

log = logging.getLogger("cirkit")

STALE_FRACTION = 0.1  # rebuild the ANN index once more than this share of rows is unindexed
INDEX_TYPES = ("IVF_PQ", "IVF_HNSW_SQ")
# k-means training: LanceDB's defaults (50 iterations, 256 samples per centroid) took
# 2-5x longer to build on 2 CPU cores for no measurable recall gain on our benchmark.
KMEANS_ITERATIONS = 20
KMEANS_SAMPLE_RATE = 128
MIN_ANN_ROWS = 256  # k-means needs this many rows to train


@dataclass
class IndexConfig:
    """Settings of ``cirkit index`` (see :mod:`cirkit.search` for the layout)."""

    embeddings: str | None = setting(
        None, location=True, positional=True, metavar="EMBEDDINGS",
        help="Embeddings store (X.lance or s3://.../X.lance from 'cirkit embed'); optional with --delete.")
    output: str | None = setting(None, short="-o", help="Index location: a folder or any LanceDB URI "
                                                        "(s3://, gs://, az://).")
    table: str = setting(DEFAULT_TABLE, help="Table name inside the index.")
    metadata: Path | None = setting(None, help="JSONL of {id, any columns} to store beside the vectors.")
    delete: str | None = setting(None, help="Ids to remove: a file (one per line) or id,id,...")
    ann: bool | None = setting(None, flag="--ann/--no-ann", show_default="by --ann-threshold",
                               help="Force (or drop) the ANN index.")
    ann_threshold: int = setting(100_000, ge=0, help="Build an ANN index from this many rows.")
    index_type: str = setting("IVF_PQ", choices=INDEX_TYPES, help="ANN index kind.")
    num_partitions: int | None = setting(None, ge=1, show_default="min(sqrt(N), N/256)", help="IVF partitions.")
    num_sub_vectors: int | None = setting(None, ge=1, show_default="largest divisor of dim <= dim/8",
                                          help="PQ sub-vectors.")
    cache_dir: Path | None = setting(None, cli=False, show_default="beside a local index",
                                     help="Folder of the exact-search vector cache.")
    sync: bool = setting(False, help="Also delete the indexed ids that are not in EMBEDDINGS any more "
                                     "(after 'cirkit embed --sync', the index holds exactly the folder's images).")
    wait: bool = wait_setting()
    storage_options: str | None = storage_options_setting()

    def __post_init__(self) -> None:
        if isinstance(self.embeddings, Path):
            self.embeddings = str(self.embeddings)
        check_settings(self)


# -- inputs --------------------------------------------------------------------------------------


def _parse_delete(value: str | None) -> list[str]:
    if not value:
        return []
    p = Path(value)
    if p.is_file():
        return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    return [v.strip() for v in value.split(",") if v.strip()]


def _sql_list(ids: Sequence[str]) -> str:
    return ", ".join("'" + i.replace("'", "''") + "'" for i in ids)


def read_metadata(path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Metadata JSONL: one object per line with ``id`` and any other columns."""
    from cirkit.io.jsonl import read_jsonl

    rows: dict[str, dict[str, Any]] = {}
    columns: list[str] = []
    for lineno, obj in read_jsonl(path):
        if not isinstance(obj, dict):
            raise RecordError(path, lineno, "expected a JSON object with an 'id'")
        if not isinstance(obj.get("id"), str) or not obj["id"].strip():
            raise RecordError(path, lineno, "missing or not a string (metadata lines need the image id)", "id")
        for key in obj:
            if key != "id" and (key in RESERVED or key.startswith("_")):
                raise RecordError(path, lineno, "reserved column name; rename it", key)
            if key != "id" and (not key.strip() or "." in key or any(ord(ch) < 32 for ch in key)):
                # Lance reads '.' as a path into a struct; empty or control-character names cannot be queried
                raise RecordError(path, lineno, "not a usable column name (empty, or with '.' or control "
                                                "characters); rename it", key)
            if key != "id" and key not in columns:
                columns.append(key)
        if obj["id"] in rows:
            raise RecordError(path, lineno, f"duplicate id {obj['id']!r}", "id")
        rows[obj["id"]] = {k: v for k, v in obj.items() if k != "id"}
    return rows, columns


def _load_embeddings(path: str, storage_options: dict[str, str] | None = None,
                     ) -> tuple[EmbeddingManifest, list[str], list[str], np.ndarray]:
    from cirkit.io.embeddings import read_embeddings
    from cirkit.io.storage import is_local

    try:
        manifest, ids, images, vectors = read_embeddings(path, storage_options)
    except ValueError as e:
        raise CirkitError(f"{path}: vectors do not match the manifest's dimension ({e})") from None
    if vectors.ndim != 2 or (len(ids) and vectors.shape[1] != manifest.dim):
        raise CirkitError(f"{path}: vectors of shape {vectors.shape} do not match the manifest's dim {manifest.dim}")
    bad = next((i for i, p in zip(ids, images, strict=True) if p and "\x00" in p), None)
    if bad is not None:
        raise CirkitError(f"{path}: row {bad!r} has an image path with a NUL character; fix the gallery and re-embed")
    if is_local(path):
        base = Path(path).parent
        images = [str((base / p).resolve()) if p and not Path(p).is_absolute() and "://" not in p and "#" not in p
                  else p for p in images]
    return manifest, ids, images, vectors


def _has_empty_struct(t) -> bool:
    """Whether an Arrow type holds a struct with no fields (Lance cannot store one)."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        return t.num_fields == 0 or any(_has_empty_struct(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _has_empty_struct(t.value_type)
    return False


def _column_arrays(columns: list[str], types: dict[str, Any], values: list[dict[str, Any]], where: str):
    """One Arrow array per metadata column, in the table's type where it has one; bad values in one line."""
    import pyarrow as pa

    out = {}
    for c in columns:
        vals = [v.get(c) for v in values]
        try:
            arr = pa.array(vals, type=types.get(c))
            out[c] = arr if arr.type != pa.null() else arr.cast(pa.string())  # all-null: a string column
        except OverflowError:
            raise CirkitError(f"{where}: metadata column {c!r} holds an integer beyond 64 bits; "
                              f"write such numbers as strings") from None
        except (pa.ArrowException, TypeError, ValueError) as e:
            have = f" (the index stores it as {types[c]})" if c in types else ""
            raise CirkitError(f"{where}: metadata column {c!r} has values of mixed or wrong types{have}: "
                              f"{str(e).splitlines()[0]}") from None
        if _has_empty_struct(out[c].type):
            raise CirkitError(f"{where}: metadata column {c!r} holds an empty object {{}}, which the index "
                              f"cannot store; drop it or give it fields")
    return out


def _other_output(folder: Path) -> str | None:
    """The kind of another stage's output ``folder`` is (its marker, or a checkpoint/synth written before markers)."""
    from cirkit.checkpoint import is_checkpoint
    from cirkit.io.atomic import read_marker
    from cirkit.synth import is_synth_output

    marker = read_marker(folder)
    if marker is not None:
        return str(marker.get("kind"))
    if is_checkpoint(folder):
        return "checkpoint"
    return "synth" if is_synth_output(folder) else None


def _check(config: IndexConfig) -> None:
    """Refuse settings that cannot work, before any work starts."""
    from cirkit.io.atomic import check_name, check_utf8_path
    from cirkit.io.embeddings import is_local, local_path

    if not config.output:
        raise UsageError("no index location; pass -o INDEX (a folder or a LanceDB URI)")
    if str(config.output) == "-":
        raise CirkitError("--output -: an index is a folder or a LanceDB URI, not a stream; give a path")
    if config.index_type not in INDEX_TYPES:
        raise CirkitError(f"unknown --index-type {config.index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    check_name(config.table, "--table")
    for flag, value in (("--num-partitions", config.num_partitions), ("--num-sub-vectors", config.num_sub_vectors)):
        if value is not None and value < 1:
            raise CirkitError(f"{flag} must be at least 1, got {value}")
    if config.ann_threshold < 0:
        raise CirkitError(f"--ann-threshold must be at least 0, got {config.ann_threshold}")
    from cirkit.io.storage import parse_storage_options

    parse_storage_options(config.storage_options)
    if config.embeddings is not None and is_local(config.embeddings) and not Path(config.embeddings).exists():
        raise CirkitError(f"{config.embeddings}: no such embeddings store (make one with 'cirkit embed')")
    if config.sync and config.embeddings is None:
        raise UsageError("--sync compares the index with an embeddings store: give EMBEDDINGS")
    if config.metadata is not None and not Path(config.metadata).is_file():
        raise CirkitError(f"{config.metadata}: no such metadata file (JSONL of {{id, columns...}})")
    if not is_local(config.output):
        return
    check_utf8_path(config.output, "index")  # Lance keeps its paths as UTF-8 text
    out = local_path(config.output).resolve()
    other = _other_output(out)
    if other:  # a checkpoint or synth folder is replaced whole by its own stage: tables put there are lost
        raise CirkitError(f"{config.output}: is a cirkit {other} folder; write the index to its own folder")
    table = out / f"{config.table}.lance"
    for name, given in (("embeddings store", config.embeddings), ("metadata file", config.metadata)):
        if given is None or not is_local(given):
            continue
        src = Path(given).resolve()
        if src in (out, table) or src in out.parents or table in src.parents:
            raise CirkitError(f"{config.output}: the index would be written into its own {name} {given}; "
                              f"pass another folder to -o")


# -- the stage -------------------------------------------------------------------------------------


def run(config: IndexConfig) -> StageResult:
    """Create or update an index from an embeddings store (see module docstring)."""
    from cirkit.io.lock import output_lock
    from cirkit.io.storage import parse_storage_options

    _check(config)
    storage = parse_storage_options(config.storage_options)
    result = StageResult("index")
    uri, name = str(config.output), config.table
    with timed(result):
        # the lock first (a second writer hears at once), then the inputs, which may be large
        with output_lock(lock_target(uri, name), wait=config.wait, what="index table"):
            emb = _load_embeddings(config.embeddings, storage) if config.embeddings else None
            meta_rows, meta_cols = read_metadata(Path(config.metadata)) if config.metadata else ({}, [])
            to_delete = _parse_delete(config.delete)
            counts = {"added": 0, "updated": 0, "unchanged": 0, "deleted": 0}
            if _table_exists(uri, name, storage):
                index = Index.open(uri, name, config.cache_dir, storage)
                _update(index, emb, meta_rows, meta_cols, config, counts, result)
            else:
                if emb is None:
                    raise CirkitError(f"{uri}: no index table {name!r} yet; give an embeddings store to create it")
                _create(uri, name, emb, meta_rows, meta_cols, config, counts, result, storage)
                index = Index.open(uri, name, config.cache_dir, storage)
            if config.sync:  # ids the store no longer has (files removed from the folder)
                stored = set(emb[1])
                to_delete += [i for i in index.cache().ids.to_pylist() if i not in stored]
            if to_delete:
                _delete(index, to_delete, counts, result)
            counts["rows"] = index.count()
            ann = _maybe_build_ann(index, config, counts)
            counts["rows"] = len(index.cache())
        result.counts = counts
        result.outputs = {"index": uri if name == DEFAULT_TABLE else f"{uri} (table {name})"}
        result.details = {
            "table": name,
            "version": index.version,
            "manifest": index.manifest.to_dict(),
            "search": "ann" if ann else "exact",
            "ann": ann,
            "cache": str(index.cache_dir),
        }
    return result


def _table_exists(uri: str, name: str, storage: dict[str, str] | None = None) -> bool:
    """Whether ``name`` is a committed table; a local one cut off while being created is removed (under the lock)."""
    from cirkit.io.embeddings import (
        connect,
        is_committed,
        is_local,
        local_path,
        remove_uncommitted,
        table_names,
    )

    if not is_local(uri):
        return name in table_names(connect(uri, storage))
    folder = local_path(uri) / f"{name}.lance"
    if folder.exists() and not folder.is_dir():
        raise CirkitError(f"{folder}: is a file, not an index table; choose another -o or --table")
    if folder.is_dir() and is_committed(folder):
        return True
    remove_uncommitted(folder, "index table")
    return False


def _create(uri: str, name: str, emb, meta_rows, meta_cols, config: IndexConfig, counts, result: StageResult,
            storage: dict[str, str] | None = None) -> None:
    """Create the table with the store's rows, its metadata columns and a fresh identity."""
    import pyarrow as pa

    from cirkit.io.embeddings import create_table, row_schema, rows_table

    manifest, ids, images, vectors = emb
    m = EmbeddingManifest.from_dict({**manifest.to_dict(), "count": None})
    cols = _column_arrays(meta_cols, {}, [meta_rows.get(i, {}) for i in ids], str(config.metadata))
    schema = row_schema(m, [pa.field(c, cols[c].type) for c in meta_cols], table_id=uuid.uuid4().hex)
    create_table(uri, name, schema, rows_table(ids, images, vectors, schema, cols) if ids else None, storage)
    counts["added"] = len(ids)
    known = set(ids)
    for k in meta_rows:
        if k not in known:
            result.skip(k, "metadata for an id with no embedding")


def _delete(index: Index, to_delete: list[str], counts, result: StageResult) -> None:
    present = set(index.cache().ids.to_pylist())
    gone = [i for i in dict.fromkeys(to_delete) if i in present]
    for i in to_delete:
        if i not in present:
            result.skip(i, "not in the index (nothing to delete)")
    for s in range(0, len(gone), 1000):
        index.table.delete(f"id IN ({_sql_list(gone[s : s + 1000])})")
    counts["deleted"] = len(gone)


def _changes(index: Index, emb, meta_rows, counts, result: StageResult) -> dict[str, tuple[str, np.ndarray, dict[str, Any]]]:
    """The rows to upsert (id -> image, vector, metadata): new ids, and ids whose vector, image or metadata changed."""
    import pyarrow as pa

    table_cols = index.metadata_columns()
    cache = index.cache()
    pos = {k: i for i, k in enumerate(cache.ids.to_pylist())}
    existing_meta: dict[str, dict[str, Any]] = {}
    if table_cols and (meta_rows or emb is not None):
        cur = index.table.search().select(["id", *table_cols]).limit(None).to_arrow().to_pylist()
        existing_meta = {r.pop("id"): r for r in cur}
    changed: dict[str, tuple[str, np.ndarray, dict[str, Any]]] = {}
    added = updated = unchanged = 0
    if emb is not None:
        _, ids, images, vectors = emb
        at = np.array([pos.get(k, -1) for k in ids], dtype=np.int64)
        same_vec = np.zeros(len(ids), dtype=bool)
        old_images: list[str | None] = [None] * len(ids)
        have = np.flatnonzero(at >= 0)
        for s in range(0, len(have), 65536):  # bulk compare, chunked to bound memory
            sel = have[s : s + 65536]
            same_vec[sel] = np.all(cache.vectors[at[sel]] == vectors[sel], axis=1)
            for j, img in zip(sel.tolist(), cache.images.take(pa.array(at[sel])).to_pylist(), strict=True):
                old_images[j] = img
        for j, k in enumerate(ids):
            new_meta = meta_rows.get(k, {})
            if at[j] < 0:
                changed[k] = (images[j], vectors[j], new_meta)
                added += 1
                continue
            old_meta = existing_meta.get(k, {})
            if same_vec[j] and old_images[j] == images[j] and all(old_meta.get(c) == v for c, v in new_meta.items()):
                unchanged += 1
            else:
                changed[k] = (images[j], vectors[j], {**old_meta, **new_meta})
                updated += 1
    emb_ids = set(emb[1]) if emb is not None else set()
    for k, new_meta in meta_rows.items():
        if k in emb_ids:
            continue
        i = pos.get(k)
        if i is None:
            result.skip(k, "metadata for an id with no embedding")
            continue
        old_meta = existing_meta.get(k, {})
        if any(old_meta.get(c) != v for c, v in new_meta.items()):
            changed[k] = (cache.images[i].as_py(), np.asarray(cache.vectors[i]), {**old_meta, **new_meta})
            updated += 1
    counts.update(added=added, updated=updated, unchanged=unchanged)
    return changed


def _update(index: Index, emb, meta_rows, meta_cols, config: IndexConfig, counts, result: StageResult) -> None:
    """Upsert changed/new rows by id; nothing is written when nothing changed."""
    import pyarrow as pa

    from cirkit.io.embeddings import rows_table

    if emb is not None:
        index.check_model(emb[0], f"{config.embeddings}")
    changed = _changes(index, emb, meta_rows, counts, result)
    if not changed:
        return
    schema = index.table.schema
    table_cols = index.metadata_columns()
    new_cols = [c for c in meta_cols if c not in schema.names]
    types = {f.name: f.type for f in schema if f.name in table_cols}
    cols = _column_arrays(table_cols + new_cols, types, [v[2] for v in changed.values()], str(config.metadata))
    if new_cols:
        index.table.add_columns([pa.field(c, cols[c].type) for c in new_cols])
        schema = index.table.schema
    vec = np.stack([np.asarray(v[1], np.float32) for v in changed.values()])
    src = rows_table(list(changed), [v[0] for v in changed.values()], vec, schema, cols)
    index.table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(src)


# -- ANN -----------------------------------------------------------------------------------------


def _build_params(index: Index, config: IndexConfig, n: int) -> dict[str, int | None]:
    params: dict[str, int | None] = dict(ann_params(n, index.manifest.dim))
    if config.num_partitions:
        params["num_partitions"] = int(config.num_partitions)
    if config.num_sub_vectors:
        if index.manifest.dim % config.num_sub_vectors:
            raise CirkitError(f"--num-sub-vectors {config.num_sub_vectors} must divide the dimension {index.manifest.dim}")
        params["num_sub_vectors"] = int(config.num_sub_vectors)
    if config.index_type != "IVF_PQ":
        params["num_sub_vectors"] = None  # HNSW_SQ quantises scalars, not sub-vectors
    return params


def _is_current(index: Index, ix, config: IndexConfig, n: int) -> bool:
    """Whether the ANN index can stay: it is the asked type, few rows are unindexed, and no build was cut off."""
    stats = index.table.index_stats(ix.name)
    kind = getattr(stats, "index_type", None)
    stale = stats is not None and stats.num_unindexed_rows > STALE_FRACTION * max(n, 1)
    if field_meta(index.table, "vector", ANN_KEY) is not None and index.ann_record() is None:
        log.info("%s: the last ANN build was cut off before it was recorded; building it again", index.label)
        return False
    # No record at all: an index an older cirkit built; it is kept (search falls back to the formula).
    return not stale and kind == config.index_type


def _maybe_build_ann(index: Index, config: IndexConfig, counts: dict[str, int]) -> dict[str, Any] | None:
    """Build, refresh or drop the ANN index as the row count and flags ask."""
    n = counts["rows"]
    want = config.ann if config.ann is not None else n >= config.ann_threshold
    ix = index.vector_index()
    if not want:
        if ix is not None and config.ann is False:
            index.table.drop_index(ix.name)
            return None
        return index.ann_info() if ix is not None else None
    if n < MIN_ANN_ROWS:
        if ix is not None:  # an index trained earlier still serves 'auto' search
            log.warning("%s: %d rows is too few to retrain the ANN index (needs %d); keeping the one built earlier",
                        index.label, n, MIN_ANN_ROWS)
            return index.ann_info()
        log.warning("%s: %d rows is too few to train an ANN index (needs %d); searching exactly",
                    index.label, n, MIN_ANN_ROWS)
        return None
    params = _build_params(index, config, n)
    if ix is not None and _is_current(index, ix, config, n):
        if config.num_partitions or config.num_sub_vectors:
            log.warning("%s: the ANN index is current, so --num-partitions/--num-sub-vectors are ignored; "
                        "run with --no-ann, then --ann, to rebuild it with them", index.label)
        return index.ann_info()
    t0 = time.perf_counter()
    _build_ann(index, config, params, n)
    counts["ann_built"] = 1
    info = index.ann_info() or {}
    info["build_seconds"] = round(time.perf_counter() - t0, 2)
    return info


def _build_ann(index: Index, config: IndexConfig, params: dict[str, int | None], n: int) -> None:
    """Train the ANN index, then record what it was built with beside it (see :meth:`Index.ann_record`)."""
    from lancedb.index import HnswSq, IvfPq

    common = {"distance_type": "cosine", "num_partitions": params["num_partitions"],
              "max_iterations": KMEANS_ITERATIONS, "sample_rate": KMEANS_SAMPLE_RATE}
    if config.index_type == "IVF_PQ":
        cfg = IvfPq(num_sub_vectors=params["num_sub_vectors"], **common)
    else:
        cfg = HnswSq(**common)
    record = {"index_uuid": None, "index_type": config.index_type, "distance": "cosine", **params, "rows_at_build": n}
    # Recorded as pending first: a kill between the build and the final record leaves a record
    # that names no index, which the next run rebuilds (_is_current) instead of guessing.
    _record_ann(index, record)
    index.table.create_index("vector", config=cfg, replace=True)
    _record_ann(index, {**record, "index_uuid": getattr(index.vector_index(), "index_uuid", None) or "unknown"})


def _record_ann(index: Index, record: dict[str, Any]) -> None:
    index.table.update_field_metadata({"path": "vector", "metadata": {ANN_KEY.decode(): json.dumps(record)}})
