"""Searching a cirkit index: open it, check the query model, rank exactly or through ANN.

``cirkit index`` (:mod:`cirkit.index`) builds and updates the table; this module only reads
it (as clip-retrieval's ``clip_back`` reads what ``clip_index`` built). ``query`` talks to
this module alone.

Layout (``INDEX`` is any LanceDB URI; a plain path is a local folder):

``INDEX/<table>.lance``
    The rows of :func:`cirkit.io.embeddings.row_schema` (``id``, ``image``, ``vector``, then
    the user's metadata columns). The :class:`~cirkit.records.EmbeddingManifest` sits in
    the schema metadata under ``cirkit``, so a table cannot hold vectors from two models.
    The ``id`` field's metadata holds the table's identity (a uuid written when the table is
    created), and the ``vector`` field's metadata the ANN parameters actually built
    (:data:`ANN_KEY`: index uuid, type, partitions, sub-vectors, rows at build).
``INDEX/<table>.cache/<identity>-v<version>.rows.arrow`` and ``.vectors.npy``
    The exact-search cache: the table's ``_rowid``, ``id``, ``image`` (Arrow IPC file) and
    its vectors as one float32 ``(N, dim)`` ``.npy``, both in ``_rowid`` order, both
    memory-mapped when read. They are keyed by the table's identity *and* its Lance
    version, so a table dropped and re-created, or two tables sharing ``--cache-dir``,
    never read each other's cache. One process builds a cache at a time (a lock per
    identity; a reader that finds it being built waits, then reads it); files appear by
    atomic rename, so readers never see half of one. For remote URIs (``s3://``, ``gs://``,
    ``az://``: :mod:`cirkit.io.storage`) the cache lives under ``$CIRKIT_CACHE_DIR`` (default
    ``~/.cache/cirkit/index``) in a folder named by a hash of URI and table, so exact search
    reads the table from object storage once per version and then works from local disk.

Search is exact (:func:`cirkit.retrieval.topk` over the cache, the same ranking
``evaluate`` uses) unless the table has an ANN index, in which case LanceDB's IVF search
with cosine distance, ``nprobes`` and exact ``refine_factor`` re-ranking is used. The search
*strategy* (``auto``, ``exact``, ``ann``) is a separate word from the query's fusion
*mode*. A ``where`` filter works in both: the exact path asks LanceDB for the ``_rowid``
of matching rows and ranks only those vectors.

ANN parameters (``ann_params``), for N rows of dimension d:
``num_partitions = clamp(min(round(sqrt(N)), N // 256), 1, 4096)`` (k-means wants ~256
rows per centroid); ``num_sub_vectors`` = the largest divisor of d that is at most d/8
(8-dim sub-vectors: 64 for d=512). At query time ``nprobes = max(16, ceil(0.02 *
num_partitions))`` of the partitions the index was *built* with (recorded at build), and
``refine_factor = 30`` unless given (tuned with ``benchmarks/search_latency.py``:
recall@10 0.98 at 1M x 512).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cirkit.errors import CirkitError
from cirkit.io.embeddings import read_manifest_from_schema, table_id_of
from cirkit.io.storage import is_local, local_path, lock_path
from cirkit.records import EmbeddingManifest, Hit

log = logging.getLogger("cirkit")

RESERVED = ("id", "image", "vector", "_rowid", "_distance", "_score")
DEFAULT_TABLE = "images"
STRATEGIES = ("auto", "exact", "ann")
ANN_KEY = b"cirkit.ann"  # on the ``vector`` field: what the ANN index was built with
# PQ codes only shortlist; recall comes from re-ranking k * refine_factor candidates exactly.
# benchmarks/search_latency.py at 1M x 512: refine 10 -> recall@10 0.81, 30 -> 0.98, 50 -> 0.998,
# while nprobes 10..40 barely moved it.
DEFAULT_REFINE = 30


# -- parameters ------------------------------------------------------------------------------


def ann_params(num_rows: int, dim: int) -> dict[str, int]:
    """Partitions and sub-vectors for ``num_rows`` vectors of ``dim`` (formula in module docstring)."""
    # k-means needs ~256 rows per partition to train each centroid
    partitions = int(min(4096, max(1, min(round(math.sqrt(max(num_rows, 1))), num_rows // 256))))
    limit = max(1, dim // 8)
    sub = max(d for d in range(1, limit + 1) if dim % d == 0)
    return {"num_partitions": partitions, "num_sub_vectors": sub}


def default_nprobes(num_partitions: int) -> int:
    """Partitions probed per query unless ``--nprobes`` says otherwise."""
    return int(min(num_partitions, max(16, math.ceil(0.02 * num_partitions))))


# -- locations -------------------------------------------------------------------------------


def lock_target(uri: str, table: str) -> Path:
    """What :func:`cirkit.io.lock.output_lock` locks for one writer per table: the table's folder,
    or for a remote URI a file in the local cache (a lock between processes of this machine only:
    see :mod:`cirkit.io.storage`)."""
    return local_path(uri) / f"{table}.lance" if is_local(uri) else lock_path(f"{str(uri).rstrip('/')}/{table}.lance")


def cache_dir_for(uri: str, table: str, override: Path | None = None) -> Path:
    """Where the exact-search cache of ``uri``/``table`` lives (beside a local table)."""
    if override is not None:
        return Path(override)
    if is_local(uri):
        return local_path(uri) / f"{table}.cache"
    root = Path(os.environ.get("CIRKIT_CACHE_DIR", Path.home() / ".cache" / "cirkit" / "index"))
    return root / hashlib.sha1(f"{uri}\0{table}".encode()).hexdigest()[:16]


def describe(m: EmbeddingManifest) -> str:
    return f"{m.backbone} {m.checkpoint} (dim {m.dim})"


def field_meta(table, column: str, key: bytes) -> dict[str, Any] | None:
    """A JSON object kept in one field's metadata, or None (absent or unreadable)."""
    try:
        raw = (table.schema.field(column).metadata or {}).get(key)
        obj = json.loads(raw) if raw else None
    except (KeyError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# -- the index -------------------------------------------------------------------------------


class Index:
    """An open cirkit index: the LanceDB table, its manifest, and its search paths."""

    def __init__(self, uri: str, table_name: str, table, cache_dir: Path | None = None):
        self.uri, self.table_name, self.table = str(uri), table_name, table
        self.label = f"{uri}" + ("" if table_name == DEFAULT_TABLE else f" (table {table_name})")
        self.manifest = read_manifest_from_schema(table.schema, self.label, made_by="index")
        self.own_cache_dir = cache_dir is None
        self.cache_dir = cache_dir_for(self.uri, table_name, cache_dir)
        self._cache: VectorCache | None = None
        self._facts: dict[str, Any] = {}
        self._facts_version: int | None = None

    @classmethod
    def open(cls, uri: str | Path, table: str = DEFAULT_TABLE, cache_dir: Path | None = None,
             storage_options: dict[str, str] | None = None) -> Index:
        """Open an existing index; a missing one is a user error naming the fix.

        ``storage_options``: object-storage options of a remote URI (credentials from the
        environment when None; :mod:`cirkit.io.storage`).
        """
        from cirkit.io.atomic import check_name
        from cirkit.io.embeddings import connect

        uri = str(uri)
        check_name(table, "--table")
        hint = f"make one with 'cirkit index EMBEDDINGS -o {uri}'"
        if is_local(uri) and not (local_path(uri) / f"{table}.lance").exists():
            raise CirkitError(f"{uri}: no index table {table!r} here; {hint}")
        try:
            tbl = connect(uri, storage_options).open_table(table)
        except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
            raise CirkitError(f"{uri}: cannot open index table {table!r} ({str(e).splitlines()[0]}); {hint}") from None
        return cls(uri, table, tbl, cache_dir)

    # -- facts ---------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.table.version)

    def _fact(self, name: str, compute):
        """A fact of the current table version, computed once per version."""
        if self._facts_version != self.version:
            self._facts, self._facts_version = {}, self.version
        if name not in self._facts:
            self._facts[name] = compute()
        return self._facts[name]

    @property
    def identity(self) -> str:
        """What tells this table from any other, across drops, re-creations and shared cache dirs."""
        return self._fact("identity", self._identity)

    def _identity(self) -> str:
        found = table_id_of(self.table.schema)
        if found:
            return found
        # A table made before cirkit wrote an identity: the commit time of the current
        # version tells a re-created table from the old one at the same version number.
        stamp = next((str(v["timestamp"]) for v in self.table.list_versions() if int(v["version"]) == self.version), "")
        return "legacy" + hashlib.sha1(f"{self.uri}\0{self.table_name}\0{stamp}".encode()).hexdigest()[:16]

    @property
    def cache_key(self) -> str:
        return f"{self.identity}-v{self.version}"

    def count(self) -> int:
        return int(self.table.count_rows())

    def metadata_columns(self) -> list[str]:
        return [n for n in self.table.schema.names if n not in RESERVED]

    def vector_index(self):
        """The ANN index on ``vector`` (LanceDB IndexConfig), or None."""
        return self._fact("vector_index", self._vector_index)

    def _vector_index(self):
        for ix in self.table.list_indices():
            if "vector" in list(ix.columns):
                return ix
        return None

    def ann_record(self) -> dict[str, Any] | None:
        """The parameters the current ANN index was built with, as recorded at its build.

        None when there is no ANN index, or when it was not built by this cirkit (no record,
        or a record of an earlier index: a build cut off before it was recorded).
        """
        ix = self.vector_index()
        rec = field_meta(self.table, "vector", ANN_KEY)
        # a pending record (index_uuid None) or one of an earlier index never matches
        if ix is None or rec is None or rec.get("index_uuid") != (getattr(ix, "index_uuid", None) or "unknown"):
            return None
        return rec

    def nprobes(self) -> int:
        """The default ``nprobes``: from the partitions the index was built with."""
        rec = self.ann_record()
        if rec and rec.get("num_partitions"):
            return default_nprobes(int(rec["num_partitions"]))
        # Unrecorded (another tool built it): the formula at the rows the index covers.
        ix = self.vector_index()
        stats = self.table.index_stats(ix.name) if ix is not None else None
        rows = stats.num_indexed_rows if stats is not None else self.count()
        return default_nprobes(ann_params(rows, self.manifest.dim)["num_partitions"])

    def ann_info(self) -> dict[str, Any] | None:
        """The ANN index as built (type, partitions, sub-vectors, rows at build) and its coverage now."""
        ix = self.vector_index()
        if ix is None:
            return None
        stats = self.table.index_stats(ix.name)
        info: dict[str, Any] = {"name": ix.name, "index_type": getattr(stats, "index_type", ix.index_type)}
        if stats is not None:
            info["indexed_rows"] = stats.num_indexed_rows
            info["unindexed_rows"] = stats.num_unindexed_rows
        rec = self.ann_record()
        if rec is not None:
            info.update({k: rec.get(k) for k in ("num_partitions", "num_sub_vectors", "rows_at_build")})
        else:
            details = getattr(ix, "index_details", None) or {}
            info.update(num_partitions=None, rows_at_build=None,
                        num_sub_vectors=(details.get("compression") or {}).get("num_sub_vectors"))
        info["recorded"] = rec is not None
        info["nprobes"] = self.nprobes()
        return info

    def check_model(self, other: EmbeddingManifest, what: str = "the query model") -> None:
        """Refuse vectors from another backbone/checkpoint/dimension, naming both."""
        if other.fingerprint() == self.manifest.fingerprint():
            return
        if (other.backbone, other.checkpoint) == (self.manifest.backbone, self.manifest.checkpoint):
            raise CirkitError(
                f"{self.label}: holds dim-{self.manifest.dim} vectors but {what} gives dim {other.dim}; "
                f"re-embed with the same model or index into a new location"
            )
        raise CirkitError(
            f"{self.label}: built with {describe(self.manifest)}, but {what} is {describe(other)}; "
            f"use the same model, or build a separate index with -o"
        )

    # -- exact cache -----------------------------------------------------------------------
    def cache(self) -> VectorCache:
        """The exact-search cache for the current table version (built if missing or stale)."""
        if self._cache is None or self._cache.key != self.cache_key:
            self._cache = VectorCache.load_or_build(self)
        return self._cache

    def filter_rowids(self, where: str) -> np.ndarray:
        """``_rowid`` of the rows matching a SQL ``where`` on metadata columns."""
        try:
            data = self.table.search().where(where).with_row_id(True).select(["id"]).limit(None).to_arrow()
        except Exception as e:  # LanceDB raises several types for SQL errors
            raise CirkitError(f"--where {where!r}: {str(e).splitlines()[0]} (columns: {', '.join(self.table.schema.names[:20])})") from None
        return data.column("_rowid").to_numpy().astype(np.uint64)

    # -- search ----------------------------------------------------------------------------
    def search(
        self,
        queries,
        k: int = 10,
        where: str | None = None,
        strategy: str = "auto",
        nprobes: int | None = None,
        refine_factor: int | None = None,
        exclude: Sequence[Sequence[str]] | None = None,
        metadata: bool = False,
    ) -> list[list[Hit]]:
        """Top-``k`` hits per query vector; ``strategy`` is auto (ANN if built), exact or ann.

        ``exclude[i]`` lists ids (or image paths) query ``i`` must not return; with
        ``metadata`` each hit carries the row's metadata columns.
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.shape[1] != self.manifest.dim:
            raise CirkitError(f"{self.label}: query vectors have dim {q.shape[1]}, the index holds dim {self.manifest.dim}")
        use_ann = self.uses_ann(strategy)
        columns = self.metadata_columns() if metadata else []
        margin = 0
        todo = list(range(len(q)))
        results: dict[int, list[Hit]] = {}
        while todo:
            kk = k + margin + max((len(exclude[i]) for i in todo), default=0) if exclude else k
            if use_ann:
                got = [self._ann_one(q[i], kk, where, nprobes, refine_factor, columns) for i in todo]
            else:
                got = self._exact(q[todo], kk, where, columns)
            again = []
            for i, hits in zip(todo, got, strict=True):
                ban = set(exclude[i]) if exclude else set()
                kept = [h for h in hits if h.id not in ban and h.image not in ban]
                if len(kept) < k and len(hits) == kk and ban:
                    again.append(i)  # exclusions ate into the top-k: fetch deeper
                results[i] = [Hit(r + 1, h.id, h.score, h.image, h.metadata) for r, h in enumerate(kept[:k])]
            todo = again
            margin = max(2 * margin, k)
        return [results[i] for i in range(len(q))]

    def uses_ann(self, strategy: str) -> bool:
        """Whether a search with ``strategy`` (auto | exact | ann) goes through the ANN index."""
        if strategy not in STRATEGIES:
            raise CirkitError(f"unknown search strategy {strategy!r}; choose auto, exact or ann")
        if strategy == "exact":
            return False
        has = self.vector_index() is not None
        if strategy == "ann" and not has:
            raise CirkitError(f"{self.label}: has no ANN index; build one with 'cirkit index --ann -o {self.uri}' or search exactly")
        return has

    def _exact(self, q: np.ndarray, k: int, where: str | None, columns: list[str]) -> list[list[Hit]]:
        cache = self.cache()
        hits = cache.search(q, k, self.filter_rowids(where) if where else None)
        if columns:
            self._attach_metadata(cache, hits, columns)
        return hits

    def _attach_metadata(self, cache: VectorCache, hits: list[list[Hit]], columns: list[str]) -> None:
        """Fill ``metadata`` of exact hits from the table rows they came from (one read)."""
        rowids = sorted({h.extra["_rowid"] for hs in hits for h in hs})
        if not rowids:
            return
        data = self.table.take_row_ids(rowids).select(columns).with_row_id().to_arrow().to_pylist()
        by_row = {r.pop("_rowid"): r for r in data}
        for hs in hits:
            for h in hs:
                h.metadata = by_row.get(h.extra.pop("_rowid"), {})

    def _ann_one(self, vec: np.ndarray, k: int, where: str | None, nprobes: int | None, refine: int | None,
                 columns: list[str]) -> list[Hit]:
        b = (
            self.table.search(vec, vector_column_name="vector")
            .distance_type("cosine")
            .nprobes(int(nprobes or self.nprobes()))
            .limit(k)
            .select(["id", "image", "_distance", *columns])
        )
        r = DEFAULT_REFINE if refine is None else int(refine)
        if r > 1:
            b = b.refine_factor(r)
        if where:
            b = b.where(where, prefilter=True)
        try:
            data = b.to_arrow()
        except Exception as e:  # LanceDB raises several types for SQL errors
            if not where:
                raise
            raise CirkitError(f"--where {where!r}: {str(e).splitlines()[0]}") from None
        ids = data.column("id").to_pylist()
        images = data.column("image").to_pylist()
        dist = data.column("_distance").to_numpy()
        meta = data.select(columns).to_pylist() if columns else [{} for _ in ids]
        order = sorted(range(len(ids)), key=lambda j: (dist[j], ids[j]))
        return [Hit(n + 1, ids[j], 1.0 - float(dist[j]), images[j], meta[j]) for n, j in enumerate(order)]


def open_index(uri: str | Path, table: str = DEFAULT_TABLE, cache_dir: Path | None = None,
               storage_options: dict[str, str] | None = None) -> Index:
    """Open an index for searching (see :class:`Index`)."""
    return Index.open(uri, table, cache_dir, storage_options)


# -- the exact-search cache --------------------------------------------------------------------

_CACHE_FILE = re.compile(r"(?P<ident>.+)-v(?P<version>\d+)\.(rows\.arrow|vectors\.npy)")
_OLD_CACHE_FILE = re.compile(r"v\d+\.(rows\.arrow|vectors\.npy)")  # keyed by version alone (before identities)


class VectorCache:
    """Memory-mapped float32 vectors + rowid/id/image of one table version, ranked exactly."""

    def __init__(self, key: str, rowids: np.ndarray, ids, images, vectors: np.ndarray):
        self.key, self.rowids, self.ids, self.images, self.vectors = key, rowids, ids, images, vectors

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @staticmethod
    def paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
        return cache_dir / f"{key}.rows.arrow", cache_dir / f"{key}.vectors.npy"

    @classmethod
    def load(cls, cache_dir: Path, key: str) -> VectorCache | None:
        """The cache files of ``key``, memory-mapped; None when absent or unreadable."""
        import pyarrow as pa

        rows_p, vec_p = cls.paths(cache_dir, key)
        if not (rows_p.exists() and vec_p.exists()):
            return None
        try:
            rows = pa.ipc.open_file(pa.memory_map(str(rows_p), "r")).read_all()
            # a plain ndarray view of the mapping: no memmap subclass overhead per matmul
            vectors = np.load(vec_p, mmap_mode="r").view(np.ndarray)
        except (OSError, ValueError, pa.ArrowInvalid) as e:  # e.g. removed by a newer version's build
            log.debug("index cache %s unreadable (%s)", vec_p, e)
            return None
        if len(rows) != len(vectors):
            return None
        return cls(key, rows.column("_rowid").to_numpy(), rows.column("id"), rows.column("image"), vectors)

    @classmethod
    def load_or_build(cls, index: Index) -> VectorCache:
        """Read the cache of the index's current version, building it (one process at a time) if missing."""
        from cirkit.io.lock import output_lock

        key = index.cache_key
        got = cls.load(index.cache_dir, key)
        if got is not None:
            return got
        with contextlib.ExitStack() as stack:
            try:
                # one lock per table identity: a second builder waits, then reads what the first wrote
                stack.enter_context(output_lock(index.cache_dir / index.identity, wait=True, what="search cache"))
            except (OSError, CirkitError) as e:  # a read-only or odd location: search from memory
                log.warning("cannot use the index cache in %s (%s); searching from memory", index.cache_dir, e)
                return cls.build(index, write=False)
            got = cls.load(index.cache_dir, key)
            return got if got is not None else cls.build(index)

    @classmethod
    def build(cls, index: Index, write: bool = True) -> VectorCache:
        """Read id/image/vector of the current version; write the cache files atomically (under the lock)."""
        import pyarrow as pa

        t0 = time.perf_counter()
        key, dim = index.cache_key, index.manifest.dim
        data = index.table.search().with_row_id(True).select(["id", "image", "vector"]).limit(None).to_arrow()
        rowids = data.column("_rowid").to_numpy().astype(np.uint64)
        order = np.argsort(rowids, kind="stable")
        flat = data.column("vector").combine_chunks()
        n = len(rowids)
        vectors = flat.values.to_numpy(zero_copy_only=False).reshape(n, dim) if n else np.zeros((0, dim), np.float32)
        vectors = np.ascontiguousarray(vectors[order], dtype=np.float32)
        rows = pa.table(
            {
                "_rowid": pa.array(rowids[order], pa.uint64()),
                "id": data.column("id").take(pa.array(order)),
                "image": data.column("image").take(pa.array(order)),
            }
        )
        here = cls(key, rows.column("_rowid").to_numpy(), rows.column("id"), rows.column("image"), vectors)
        if not write:
            return here
        try:
            cls._write(index, rows, vectors)
        except OSError as e:  # read-only location, disk full: search from memory this time
            log.warning("cannot write index cache in %s (%s); searching from memory", index.cache_dir, e)
            return here
        log.debug("index cache %s: %d rows in %.1fs", key, n, time.perf_counter() - t0)
        return cls.load(index.cache_dir, key) or here

    @classmethod
    def _write(cls, index: Index, rows, vectors: np.ndarray) -> None:
        import pyarrow as pa

        from cirkit.io.atomic import atomic_write

        rows_p, vec_p = cls.paths(index.cache_dir, index.cache_key)
        with atomic_write(rows_p, "wb") as fh:
            with pa.ipc.new_file(fh, rows.schema) as w:
                w.write_table(rows)
        with atomic_write(vec_p, "wb") as fh:  # vectors last: a present .npy means a complete pair
            np.save(fh, vectors)
        for old in index.cache_dir.iterdir():
            m = _CACHE_FILE.fullmatch(old.name)
            if m is None:
                stale = index.own_cache_dir and _OLD_CACHE_FILE.fullmatch(old.name) is not None
            elif m["ident"] == index.identity:
                stale = int(m["version"]) < index.version  # never a newer version another reader built
            else:  # another table's: stale only in this table's own folder (it was dropped)
                stale = index.own_cache_dir
            if stale:
                old.unlink(missing_ok=True)

    def positions(self, rowids: np.ndarray) -> np.ndarray:
        """Cache rows of the given ``_rowid`` values (values not in this version are dropped)."""
        if not len(self.rowids):
            return np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self.rowids, rowids), len(self.rowids) - 1)
        return pos[self.rowids[pos] == rowids]

    def search(self, queries: np.ndarray, k: int, rowids: np.ndarray | None = None) -> list[list[Hit]]:
        """Exact top-``k`` by dot product (cosine on normalised vectors); ties by row order.

        Hits carry their ``_rowid`` in ``extra`` (for fetching metadata).
        """
        from cirkit.retrieval import topk

        if rowids is not None:
            pos = np.sort(self.positions(np.asarray(rowids, np.uint64)))
            gallery = self.vectors[pos]
        else:
            pos = None
            gallery = self.vectors
        if min(k, gallery.shape[0]) <= 0:
            return [[] for _ in range(len(queries))]
        top, val = topk(queries, gallery, k)
        top, val = top.numpy(), val.numpy()
        rows = top if pos is None else pos[top]
        out: list[list[Hit]] = []
        for j in range(len(queries)):
            ids = self.ids.take(rows[j]).to_pylist()
            images = self.images.take(rows[j]).to_pylist()
            rids = self.rowids[rows[j]].tolist()
            out.append([Hit(r + 1, ids[r], float(val[j, r]), images[r], extra={"_rowid": rids[r]})
                        for r in range(len(ids))])
        return out
