"""A persistent, incremental LanceDB index over embedded images, and the search ``query`` uses.

Layout (``INDEX`` is any LanceDB URI; a plain path is a local folder):

``INDEX/<table>.lance``
    Columns ``id`` (string, unique), ``image`` (string, absolute path when the embeddings
    gave a relative one), ``vector`` (fixed_size_list<float32>[dim]), then the user's
    metadata columns. The :class:`~cirkit.records.EmbeddingManifest` that produced the
    vectors sits in the schema metadata under ``cirkit`` (written when the table is
    created, never changed), so a table cannot hold vectors from two models.
``INDEX/<table>.cache/v<version>.rows.arrow`` and ``v<version>.vectors.npy``
    The exact-search cache: the table's ``_rowid``, ``id``, ``image`` (Arrow IPC file) and
    its vectors as one float32 ``(N, dim)`` ``.npy``, both in ``_rowid`` order, both
    memory-mapped when read. They are keyed by the Lance table version, written atomically
    (vectors last, so a present ``.npy`` means a complete pair) and rebuilt whenever the
    table's version moves. For remote URIs the cache lives under ``$CIRKIT_CACHE_DIR``
    (default ``~/.cache/cirkit/index``) in a folder named by a hash of URI and table.

Search is exact (numpy matmul + argpartition over the cache) unless the table has an
ANN index (built when the table reaches ``ann_threshold`` rows or on ``--ann``), in which
case LanceDB's IVF_PQ search with cosine distance, ``nprobes`` and exact
``refine_factor`` re-ranking is used. A ``where`` filter works in both: the exact path
asks LanceDB for the ``_rowid`` of matching rows and searches only those vectors.

ANN parameters (``ann_params``), for N rows of dimension d:
``num_partitions = clamp(min(round(sqrt(N)), N // 256), 1, 4096)`` (k-means wants ~256
rows per centroid); ``num_sub_vectors`` = the largest
divisor of d that is at most d/8 (8-dim sub-vectors: 64 for d=512); at query time
``nprobes = max(16, ceil(0.02 * num_partitions))`` and ``refine_factor = 30`` unless given
(tuned with ``benchmarks/search_latency.py``: recall@10 0.98 at 1M x 512).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cirkit.config import check_settings, setting
from cirkit.errors import CirkitError, RecordError
from cirkit.io.embeddings import MANIFEST_KEY, read_manifest_from_schema
from cirkit.records import EmbeddingManifest
from cirkit.summary import StageResult, timed

log = logging.getLogger("cirkit")

RESERVED = ("id", "image", "vector", "_rowid", "_distance", "_score")
DEFAULT_TABLE = "images"
STALE_FRACTION = 0.1  # rebuild the ANN index once more than this share of rows is unindexed
INDEX_TYPES = ("IVF_PQ", "IVF_HNSW_SQ")
# k-means training: LanceDB's defaults (50 iterations, 256 samples per centroid) took
# 2-5x longer to build on 2 CPU cores for no measurable recall gain on our benchmark.
KMEANS_ITERATIONS = 20
KMEANS_SAMPLE_RATE = 128


@dataclass
class IndexConfig:
    """Settings of ``cirkit index`` (see the module docstring for the layout)."""

    embeddings: Path | None = setting(
        None, positional=True, metavar="EMBEDDINGS",
        help="Embeddings store (X.lance from 'cirkit embed'); optional with --delete.")
    output: str | None = setting(None, short="-o", help="Index location: a folder or any LanceDB URI.")
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

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass
class Hit:
    """One search result."""

    rank: int
    id: str
    score: float
    image: str

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "score": round(float(self.score), 6), "image": self.image}


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


# PQ codes only shortlist; recall comes from re-ranking k * refine_factor candidates exactly.
# benchmarks/search_latency.py at 1M x 512: refine 10 -> recall@10 0.81, 30 -> 0.98, 50 -> 0.998,
# while nprobes 10..40 barely moved it.
DEFAULT_REFINE = 30


# -- opening ---------------------------------------------------------------------------------


def _is_local(uri: str) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(str(uri)[len("file://"):] if str(uri).startswith("file://") else str(uri)).expanduser()


def cache_dir_for(uri: str, table: str, override: Path | None = None) -> Path:
    """Where the exact-search cache of ``uri``/``table`` lives (beside a local table)."""
    if override is not None:
        return Path(override)
    if _is_local(uri):
        return _local_path(uri) / f"{table}.cache"
    root = Path(os.environ.get("CIRKIT_CACHE_DIR", Path.home() / ".cache" / "cirkit" / "index"))
    return root / hashlib.sha1(f"{uri}\0{table}".encode()).hexdigest()[:16]


def manifest_of(table, where: str) -> EmbeddingManifest:
    """The manifest of an index table (the model that made its vectors)."""
    return read_manifest_from_schema(table.schema, where, made_by="index")


def describe(m: EmbeddingManifest | dict) -> str:
    d = m.to_dict() if isinstance(m, EmbeddingManifest) else m
    return f"{d.get('backbone')} {d.get('checkpoint')} (dim {d.get('dim')})"


class Index:
    """An open cirkit index: the LanceDB table, its manifest, and its search paths."""

    def __init__(self, uri: str, table_name: str, table, cache_dir: Path | None = None):
        self.uri, self.table_name, self.table = str(uri), table_name, table
        self.label = f"{uri}" + ("" if table_name == DEFAULT_TABLE else f" (table {table_name})")
        self.manifest = manifest_of(table, self.label)
        self.cache_dir = cache_dir_for(self.uri, table_name, cache_dir)
        self._cache: VectorCache | None = None
        self._count: int | None = None
        self._count_version: int | None = None

    @classmethod
    def open(cls, uri: str | Path, table: str = DEFAULT_TABLE, cache_dir: Path | None = None) -> Index:
        """Open an existing index; a missing one is a user error naming the fix."""
        import lancedb

        uri = str(uri)
        hint = f"make one with 'cirkit index EMBEDDINGS -o {uri}'"
        if _is_local(uri) and not (_local_path(uri) / f"{table}.lance").exists():
            raise CirkitError(f"{uri}: no index table {table!r} here; {hint}")
        try:
            tbl = lancedb.connect(uri).open_table(table)
        except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
            raise CirkitError(f"{uri}: cannot open index table {table!r} ({e}); {hint}") from None
        return cls(uri, table, tbl, cache_dir)

    # -- facts ---------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.table.version)

    def count(self) -> int:
        return int(self.table.count_rows())

    def metadata_columns(self) -> list[str]:
        return [n for n in self.table.schema.names if n not in RESERVED]

    def vector_index(self):
        """The ANN index on ``vector`` (LanceDB IndexConfig), or None."""
        for ix in self.table.list_indices():
            if "vector" in list(ix.columns):
                return ix
        return None

    def ann_info(self) -> dict[str, Any] | None:
        """Type, partitions and coverage of the ANN index, or None when search is exact."""
        ix = self.vector_index()
        if ix is None:
            return None
        stats = self.table.index_stats(ix.name)
        info: dict[str, Any] = {"name": ix.name, "index_type": getattr(stats, "index_type", ix.index_type)}
        if stats is not None:
            info["indexed_rows"] = stats.num_indexed_rows
            info["unindexed_rows"] = stats.num_unindexed_rows
        info.update(ann_params(self.count(), self.manifest.dim))
        return info

    def check_model(self, other: EmbeddingManifest | dict, what: str = "the query model") -> None:
        """Refuse vectors from another backbone/checkpoint/dimension, naming both."""
        o = other if isinstance(other, EmbeddingManifest) else EmbeddingManifest.from_dict(
            {k: v for k, v in other.items() if k in ("backbone", "checkpoint", "dim", "normalized", "mode")}
        )
        if o.fingerprint() == self.manifest.fingerprint():
            return
        if (o.backbone, o.checkpoint) == (self.manifest.backbone, self.manifest.checkpoint):
            raise CirkitError(
                f"{self.label}: holds dim-{self.manifest.dim} vectors but {what} gives dim {o.dim}; "
                f"re-embed with the same model or index into a new location"
            )
        raise CirkitError(
            f"{self.label}: built with {describe(self.manifest)}, but {what} is {describe(o)}; "
            f"use the same model, or build a separate index with -o"
        )

    # -- exact cache -----------------------------------------------------------------------
    def cache(self) -> VectorCache:
        """The exact-search cache for the current table version (built if missing or stale)."""
        if self._cache is None or self._cache.version != self.version:
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
        mode: str = "auto",
        nprobes: int | None = None,
        refine_factor: int | None = None,
        exclude: Sequence[Sequence[str]] | None = None,
    ) -> list[list[Hit]]:
        """Top-``k`` hits per query vector; ``mode`` is auto (ANN if built), exact or ann.

        ``exclude[i]`` lists ids (or image paths) query ``i`` must not return.
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.shape[1] != self.manifest.dim:
            raise CirkitError(f"{self.label}: query vectors have dim {q.shape[1]}, the index holds dim {self.manifest.dim}")
        use_ann = self.uses_ann(mode)
        margin = 0
        todo = list(range(len(q)))
        results: dict[int, list[Hit]] = {}
        while todo:
            kk = k + margin + max((len(exclude[i]) for i in todo), default=0) if exclude else k
            if use_ann:
                got = [self._ann_one(q[i], kk, where, nprobes, refine_factor) for i in todo]
            else:
                got = self.cache().search(q[todo], kk, self.filter_rowids(where) if where else None)
            again = []
            for i, hits in zip(todo, got, strict=True):
                ban = set(exclude[i]) if exclude else set()
                kept = [h for h in hits if h.id not in ban and h.image not in ban]
                if len(kept) < k and len(hits) == kk and ban:
                    again.append(i)  # exclusions ate into the top-k: fetch deeper
                results[i] = [Hit(r + 1, h.id, h.score, h.image) for r, h in enumerate(kept[:k])]
            todo = again
            margin = max(2 * margin, k)
        return [results[i] for i in range(len(q))]

    def uses_ann(self, mode: str) -> bool:
        """Whether a search in ``mode`` (auto | exact | ann) goes through the ANN index."""
        if mode not in ("auto", "exact", "ann"):
            raise CirkitError(f"unknown search mode {mode!r}; choose auto, exact or ann")
        if mode == "exact":
            return False
        has = self.vector_index() is not None
        if mode == "ann" and not has:
            raise CirkitError(f"{self.label}: has no ANN index; build one with 'cirkit index --ann -o {self.uri}' or search exactly")
        return has

    def _ann_one(self, vec: np.ndarray, k: int, where: str | None, nprobes: int | None, refine: int | None) -> list[Hit]:
        params = ann_params(self.count_cached(), self.manifest.dim)
        b = (
            self.table.search(vec, vector_column_name="vector")
            .distance_type("cosine")
            .nprobes(int(nprobes or default_nprobes(params["num_partitions"])))
            .limit(k)
            .select(["id", "image", "_distance"])
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
        order = sorted(range(len(ids)), key=lambda j: (dist[j], ids[j]))
        return [Hit(n + 1, ids[j], 1.0 - float(dist[j]), images[j]) for n, j in enumerate(order)]

    def count_cached(self) -> int:
        """Row count, re-read only when the table version moved (one LanceDB call per search otherwise)."""
        if self._count is None or self._count_version != self.version:
            self._count, self._count_version = self.count(), self.version
        return self._count


def open_index(uri: str | Path, table: str = DEFAULT_TABLE, cache_dir: Path | None = None) -> Index:
    """Open an index for searching (see :class:`Index`)."""
    return Index.open(uri, table, cache_dir)


# -- the exact-search cache --------------------------------------------------------------------


class VectorCache:
    """Memory-mapped float32 vectors + rowid/id/image of one table version, searched with numpy."""

    def __init__(self, version: int, rowids: np.ndarray, ids, images, vectors: np.ndarray):
        self.version, self.rowids, self.ids, self.images, self.vectors = version, rowids, ids, images, vectors

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @staticmethod
    def paths(cache_dir: Path, version: int) -> tuple[Path, Path]:
        return cache_dir / f"v{version}.rows.arrow", cache_dir / f"v{version}.vectors.npy"

    @classmethod
    def load(cls, cache_dir: Path, version: int) -> VectorCache | None:
        import pyarrow as pa

        rows_p, vec_p = cls.paths(cache_dir, version)
        if not (rows_p.exists() and vec_p.exists()):
            return None
        try:
            rows = pa.ipc.open_file(pa.memory_map(str(rows_p), "r")).read_all()
            # a plain ndarray view of the mapping: no memmap subclass overhead per matmul
            vectors = np.load(vec_p, mmap_mode="r").view(np.ndarray)
        except (OSError, ValueError, pa.ArrowInvalid) as e:
            log.warning("index cache %s unreadable (%s); rebuilding", vec_p, e)
            return None
        return cls(version, rows.column("_rowid").to_numpy(), rows.column("id"), rows.column("image"), vectors)

    @classmethod
    def load_or_build(cls, index: Index) -> VectorCache:
        version = index.version
        got = cls.load(index.cache_dir, version)
        if got is not None:
            return got
        return cls.build(index)

    @classmethod
    def build(cls, index: Index) -> VectorCache:
        """Read id/image/vector of the current version and write the cache files atomically."""
        import pyarrow as pa

        from cirkit.io.atomic import atomic_write

        t0 = time.perf_counter()
        version, dim = index.version, index.manifest.dim
        data = index.table.search().with_row_id(True).select(["id", "image", "vector"]).limit(None).to_arrow()
        rowids = data.column("_rowid").to_numpy().astype(np.uint64)
        order = np.argsort(rowids, kind="stable")
        flat = data.column("vector").combine_chunks()
        n = len(rowids)
        vectors = flat.values.to_numpy(zero_copy_only=False).reshape(n, dim) if n else np.zeros((0, dim), np.float32)
        vectors = np.ascontiguousarray(vectors[order] if not _is_sorted(rowids) else vectors, dtype=np.float32)
        rows = pa.table(
            {
                "_rowid": pa.array(rowids[order], pa.uint64()),
                "id": data.column("id").take(pa.array(order)),
                "image": data.column("image").take(pa.array(order)),
            }
        )
        rows_p, vec_p = cls.paths(index.cache_dir, version)
        try:
            with atomic_write(rows_p, "wb") as fh:
                with pa.ipc.new_file(fh, rows.schema) as w:
                    w.write_table(rows)
            with atomic_write(vec_p, "wb") as fh:
                np.save(fh, vectors)
            for old in index.cache_dir.glob("v*.*"):
                if old.name.split(".")[0] != f"v{version}":
                    old.unlink(missing_ok=True)
        except OSError as e:  # read-only location: search from memory this time
            log.warning("cannot write index cache in %s (%s); searching from memory", index.cache_dir, e)
            return cls(version, rows.column("_rowid").to_numpy(), rows.column("id"), rows.column("image"), vectors)
        log.debug("index cache v%d: %d rows in %.1fs", version, n, time.perf_counter() - t0)
        got = cls.load(index.cache_dir, version)
        assert got is not None
        return got

    def positions(self, rowids: np.ndarray) -> np.ndarray:
        """Cache rows of the given ``_rowid`` values (values not in this version are dropped)."""
        if not len(self.rowids):
            return np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self.rowids, rowids), len(self.rowids) - 1)
        return pos[self.rowids[pos] == rowids]

    def search(self, queries: np.ndarray, k: int, rowids: np.ndarray | None = None) -> list[list[Hit]]:
        """Exact top-``k`` by dot product (cosine on normalised vectors); ties by row order."""
        if rowids is not None:
            pos = np.sort(self.positions(np.asarray(rowids, np.uint64)))
            gallery = self.vectors[pos]
        else:
            pos = None
            gallery = self.vectors
        n = gallery.shape[0]
        k = min(k, n)
        out: list[list[Hit]] = []
        if k == 0:
            return [[] for _ in range(len(queries))]
        chunk = max(1, min(256, (64 << 20) // max(n, 1)))
        for s in range(0, len(queries), chunk):
            qs = queries[s : s + chunk]
            # (queries, rows): each query's scores are contiguous for argpartition
            scores = qs @ gallery.T if len(qs) > 1 else (gallery @ qs[0])[None, :]
            for j in range(scores.shape[0]):
                top = topk_indices(scores[j], k)
                rows = top if pos is None else pos[top]
                ids = self.ids.take(rows).to_pylist()
                images = self.images.take(rows).to_pylist()
                out.append([Hit(r + 1, ids[r], float(scores[j, top[r]]), images[r]) for r in range(len(top))])
        return out


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first, ties broken by lower index."""
    n = scores.shape[0]
    if k >= n:
        cand = np.arange(n)
    else:
        cand = np.argpartition(scores, n - k)[n - k :]
        # include every tie of the k-th score so the lower index wins deterministically
        kth = scores[cand].min()
        if (scores[cand] == kth).sum() > 1 or np.count_nonzero(scores == kth) > (scores[cand] == kth).sum():
            cand = np.union1d(cand, np.flatnonzero(scores == kth))
    order = np.lexsort((cand, -scores[cand]))
    return cand[order][:k]


def _is_sorted(a: np.ndarray) -> bool:
    return bool(len(a) < 2 or np.all(a[1:] >= a[:-1]))


# -- building and updating -----------------------------------------------------------------------


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
            if key != "id" and key not in columns:
                columns.append(key)
        if obj["id"] in rows:
            raise RecordError(path, lineno, f"duplicate id {obj['id']!r}", "id")
        rows[obj["id"]] = {k: v for k, v in obj.items() if k != "id"}
    return rows, columns


def _load_embeddings(path: Path) -> tuple[EmbeddingManifest, list[str], list[str], np.ndarray]:
    from cirkit.io.embeddings import read_embeddings

    try:
        manifest, ids, images, vectors = read_embeddings(path)
    except ValueError as e:
        raise CirkitError(f"{path}: vectors do not match the manifest's dimension ({e})") from None
    if vectors.ndim != 2 or (len(ids) and vectors.shape[1] != manifest.dim):
        raise CirkitError(f"{path}: vectors of shape {vectors.shape} do not match the manifest's dim {manifest.dim}")
    base = Path(path).parent
    images = [str((base / p).resolve()) if p and not Path(p).is_absolute() and "://" not in p else p for p in images]
    return manifest, ids, images, vectors


def _column_arrays(columns: list[str], types: dict[str, Any], values: list[dict[str, Any]], where: str):
    import pyarrow as pa

    out = {}
    for c in columns:
        vals = [v.get(c) for v in values]
        try:
            out[c] = pa.array(vals, type=types.get(c))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
            have = f" (the index stores it as {types[c]})" if c in types else ""
            raise CirkitError(f"{where}: metadata column {c!r} has values of mixed or wrong types{have}: {e}") from None
    return out


def run(config: IndexConfig) -> StageResult:
    """Create or update an index from an embeddings store (see module docstring)."""
    import lancedb
    import pyarrow as pa

    result = StageResult("index")
    if not config.output:
        raise CirkitError("no index location; pass -o INDEX (a folder or a LanceDB URI)")
    if config.index_type not in INDEX_TYPES:
        raise CirkitError(f"unknown --index-type {config.index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    uri, name = str(config.output), config.table
    with timed(result):
        emb = _load_embeddings(Path(config.embeddings)) if config.embeddings else None
        meta_rows, meta_cols = read_metadata(Path(config.metadata)) if config.metadata else ({}, [])
        to_delete = _parse_delete(config.delete)
        if _is_local(uri):
            _local_path(uri).mkdir(parents=True, exist_ok=True)
        db = lancedb.connect(uri)
        exists = _table_exists(db, uri, name)
        counts = {"added": 0, "updated": 0, "unchanged": 0, "deleted": 0}

        if not exists:
            if emb is None:
                raise CirkitError(f"{uri}: no index table {name!r} yet; give an embeddings store to create it")
            manifest, ids, images, vectors = emb
            m = EmbeddingManifest.from_dict({**manifest.to_dict(), "count": None})
            types: dict[str, Any] = {}
            metas = [meta_rows.get(i, {}) for i in ids]
            cols = _column_arrays(meta_cols, types, metas, str(config.metadata))
            schema_fields = [("id", pa.string()), ("image", pa.string()), ("vector", pa.list_(pa.float32(), m.dim))]
            schema_fields += [(c, cols[c].type if cols[c].type != pa.null() else pa.string()) for c in meta_cols]
            schema = pa.schema(schema_fields, metadata={MANIFEST_KEY: json.dumps(m.to_dict())})
            data = _rows_table(ids, images, vectors, m.dim, {c: cols[c].cast(schema.field(c).type) for c in meta_cols},
                               schema)
            db.create_table(name, data=data) if len(ids) else db.create_table(name, schema=schema)
            counts["added"] = len(ids)
            known = set(ids)
            for k in meta_rows:
                if k not in known:
                    result.skip(k, "metadata for an id with no embedding")
        index = Index.open(uri, name, config.cache_dir)

        if exists:
            _update(index, emb, meta_rows, meta_cols, config, counts, result)

        if to_delete:
            cache = index.cache()
            present = set(cache.ids.to_pylist())
            gone = [i for i in dict.fromkeys(to_delete) if i in present]
            for i in to_delete:
                if i not in present:
                    result.skip(i, "not in the index (nothing to delete)")
            for s in range(0, len(gone), 1000):
                index.table.delete(f"id IN ({_sql_list(gone[s : s + 1000])})")
            counts["deleted"] = len(gone)

        counts["rows"] = index.count()
        ann = _maybe_build_ann(index, config, counts)
        cache = index.cache()
        counts["rows"] = len(cache)
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


def _update(index: Index, emb, meta_rows, meta_cols, config: IndexConfig, counts, result: StageResult) -> None:
    """Upsert changed/new rows by id; nothing is written when nothing changed."""
    import pyarrow as pa

    if emb is not None:
        index.check_model(emb[0], f"{config.embeddings}")
    schema = index.table.schema
    new_cols = [c for c in meta_cols if c not in schema.names]
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
    if not changed:
        return
    types = {f.name: f.type for f in schema if f.name in table_cols}
    cols = _column_arrays(table_cols + new_cols, types, [v[2] for v in changed.values()], str(config.metadata))
    if new_cols:
        index.table.add_columns([pa.field(c, cols[c].type if cols[c].type != pa.null() else pa.string()) for c in new_cols])
        schema = index.table.schema
    dim = index.manifest.dim
    vec = np.stack([np.asarray(v[1], np.float32) for v in changed.values()])
    src = _rows_table(list(changed), [v[0] for v in changed.values()], vec, dim,
                      {c: cols[c].cast(schema.field(c).type) for c in table_cols + new_cols})
    index.table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(src)


def _table_exists(db, uri: str, name: str) -> bool:
    """Whether ``name`` is a committed table; a local one cut off while being created is removed."""
    if not _is_local(uri):
        return name in db.list_tables().tables
    folder = _local_path(uri) / f"{name}.lance"
    if not folder.exists():
        return False
    if any((folder / "_versions").glob("*.manifest")):
        return True
    log.warning("%s: removing table %r, cut off before its first commit; building it again", uri, name)
    shutil.rmtree(folder)
    return False


def _rows_table(ids: list[str], images: list[str], vectors: np.ndarray, dim: int, columns: dict[str, Any],
                schema=None):
    """The Arrow table of index rows: id, image, fixed-size float32 vector, then metadata columns."""
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "image": pa.array(images, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(vectors).ravel(), pa.float32()), dim),
            **columns,
        },
        schema=schema,
    )


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
    if n < 256:
        if ix is not None:  # an index trained earlier still serves 'auto' search
            log.warning("%s: %d rows is too few to retrain the ANN index (needs 256); keeping the one built earlier",
                        index.label, n)
            return index.ann_info()
        log.warning("%s: %d rows is too few to train an ANN index (needs 256); searching exactly", index.label, n)
        return None
    params = ann_params(n, index.manifest.dim)
    if config.num_partitions:
        params["num_partitions"] = int(config.num_partitions)
    if config.num_sub_vectors:
        if index.manifest.dim % config.num_sub_vectors:
            raise CirkitError(f"--num-sub-vectors {config.num_sub_vectors} must divide the dimension {index.manifest.dim}")
        params["num_sub_vectors"] = int(config.num_sub_vectors)
    if ix is not None:
        stats = index.table.index_stats(ix.name)
        kind = getattr(stats, "index_type", None)
        stale = stats is not None and stats.num_unindexed_rows > STALE_FRACTION * max(n, 1)
        if not stale and kind == config.index_type:
            if config.num_partitions or config.num_sub_vectors:
                log.warning("%s: the ANN index is current, so --num-partitions/--num-sub-vectors are ignored; "
                            "run with --no-ann, then --ann, to rebuild it with them", index.label)
            return index.ann_info()
    from lancedb.index import HnswSq, IvfPq

    t0 = time.perf_counter()
    if config.index_type == "IVF_PQ":
        cfg = IvfPq(
            distance_type="cosine",
            num_partitions=params["num_partitions"],
            num_sub_vectors=params["num_sub_vectors"],
            max_iterations=KMEANS_ITERATIONS,
            sample_rate=KMEANS_SAMPLE_RATE,
        )
    else:
        cfg = HnswSq(
            distance_type="cosine",
            num_partitions=params["num_partitions"],
            max_iterations=KMEANS_ITERATIONS,
            sample_rate=KMEANS_SAMPLE_RATE,
        )
    index.table.create_index("vector", config=cfg, replace=True)
    counts["ann_built"] = 1
    info = index.ann_info() or {}
    info.update(params, build_seconds=round(time.perf_counter() - t0, 2))
    return info
