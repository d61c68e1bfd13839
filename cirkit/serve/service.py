"""What ``cirkit serve`` does per request, without HTTP: decode, batch, embed, search, thumbnails.

A :class:`Service` holds the model and the open index for the life of the server. Requests
are checked and their reference image decoded in the caller's thread (many at once, bounded
by a semaphore so big uploads cannot all hold decoded pixels together); embedding and search
run on the :class:`~cirkit.serve.batching.MicroBatcher`'s one worker thread, grouped so each
query gets exactly the vector ``cirkit query`` would give it (a composed, an image-only and a
text-only query never share a model call) and queries with the same filter share one search.

Everything that touches the LanceDB table holds ``Service.lock``: the table object is
refreshed in place when ``cirkit index`` commits a new version (checked at most every
``refresh_s`` seconds), and a search must never see two versions. The exact-search cache
and the index's facts are keyed by table identity and version already
(:mod:`cirkit.search`), so a new version is searched as soon as it is seen.

Only images that are rows of the index are ever opened: a reference or thumbnail is asked
for by id, the id is looked up in the table, and the path stored there is what is read.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from cirkit.errors import CirkitError, ImageError
from cirkit.serve.batching import MicroBatcher

log = logging.getLogger("cirkit")

MAX_TEXT = 2000  # characters of a modification text
MAX_WHERE = 2000  # characters of a filter
MAX_ID = 1000  # characters of an id
THUMB_SIZES = (64, 128, 192, 256, 384, 512)
THUMB_CACHE = 2048  # thumbnails kept (about 10-30 kB each)
PATH_CACHE = 100_000  # id -> image path entries kept per table version


class RequestError(CirkitError):
    """A request the server refuses: an HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


@dataclass
class Query:
    """One search request, as the API received it (validated by :meth:`Service.check`)."""

    image: bytes | None = None  # an uploaded reference
    reference_id: str | None = None  # or an indexed one
    text: str | None = None
    k: int = 10
    where: str | None = None
    exclude_reference: bool = False

    @property
    def kind(self) -> str:
        has_image = self.image is not None or self.reference_id is not None
        if has_image and self.text:
            return "composed"
        return "image" if has_image else "text"


@dataclass
class Job:
    """A query ready for the model: its transformed reference and its search settings."""

    kind: str
    pixels: Any
    text: str | None
    k: int
    where: str | None
    exclude: list[str] = field(default_factory=list)
    queued_s: float = 0.0


@dataclass
class Answer:
    """The hits of one query, the index version searched and where the time went."""

    hits: list  # cirkit.records.Hit
    version: int
    timing_ms: dict[str, float]
    batch: int


class PinnedTable:
    """A LanceDB table whose version and schema are read once per version.

    A table opened without a read-consistency interval stays at its version until
    ``checkout_latest`` (which only :meth:`Service.refresh` calls), so both are known; asking
    LanceDB is a round trip to its event-loop thread, and ``Index.search`` asks several times per
    query (2-3 ms each on a busy 2-core machine: most of a search of 100k rows).
    """

    def __init__(self, table):
        self._table = table
        self._pin()

    def _pin(self) -> None:
        self.version = int(self._table.version)
        self.schema = self._table.schema

    def checkout_latest(self) -> None:
        self._table.checkout_latest()
        self._pin()

    def __getattr__(self, name: str):
        return getattr(self._table, name)


class Service:
    """The model, the index and the batcher behind every request (see module docstring)."""

    def __init__(self, index, backbone, *, search: str = "auto", nprobes: int | None = None,
                 refine_factor: int | None = None, max_k: int = 100, max_pixels: int | None = None,
                 batch_size: int = 32, batch_wait_ms: float = 5.0, refresh_s: float = 1.0,
                 decode_slots: int | None = None):
        from cirkit.io.images import MAX_PIXELS

        index.table = PinnedTable(index.table)
        self.index, self.backbone = index, backbone
        self.model = backbone.manifest()
        index.check_model(self.model, "the served model")
        self.strategy, self.nprobes, self.refine_factor = search, nprobes, refine_factor
        index.uses_ann(search)  # an impossible --search fails at start, not per request
        self.max_k, self.max_pixels = int(max_k), int(max_pixels or MAX_PIXELS)
        self.refresh_s = float(refresh_s)
        self.transform = backbone.image_transform()
        self.lock = threading.RLock()
        self.stale: str | None = None  # why the index can no longer be searched with this model
        self.embed_calls = 0
        self._checked = time.monotonic()
        self._paths: OrderedDict[str, str | None] = OrderedDict()
        self._paths_version = index.version
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()
        # Decoded pixels are the big allocation (up to max_pixels * 3 bytes each): bound how many exist.
        self._decode = threading.BoundedSemaphore(decode_slots or max(2, os.cpu_count() or 2))
        self._tmp = tempfile.mkdtemp(prefix="cirkit-serve-")
        self.batcher = MicroBatcher(self._run_batch, max_batch=batch_size, max_wait=batch_wait_ms / 1000.0)

    @classmethod
    def open(cls, config) -> Service:
        """Open ``config.index`` and load its model once (the index's own unless ``--model`` says otherwise)."""
        from cirkit.backbones import load_backbone
        from cirkit.query import spec_for
        from cirkit.search import open_index

        index = open_index(config.index, config.table, config.cache_dir)
        backbone = load_backbone(spec_for(config, index))
        return cls(index, backbone, search=config.search, nprobes=config.nprobes, refine_factor=config.refine_factor,
                   max_k=config.max_k, max_pixels=config.max_pixels, batch_size=config.batch_size,
                   batch_wait_ms=config.batch_wait_ms, refresh_s=config.refresh_s)

    def close(self) -> None:
        self.batcher.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    # -- the index ------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Move to the table's latest version if one was committed (at most every ``refresh_s``)."""
        from cirkit.io.embeddings import read_manifest_from_schema

        with self.lock:
            now = time.monotonic()
            if not force and now - self._checked < self.refresh_s:
                return
            self._checked = now
            before = self.index.version
            try:
                self.index.table.checkout_latest()
            except Exception as e:  # a table dropped under us: keep serving what we have
                log.warning("%s: cannot check for a new version (%s); still serving version %d",
                            self.index.label, str(e).splitlines()[0] if str(e) else type(e).__name__, before)
                return
            if self.index.version == before:
                return
            log.info("%s: version %d -> %d", self.index.label, before, self.index.version)
            try:
                self.index.manifest = read_manifest_from_schema(self.index.table.schema, self.index.label, "index")
                self.index.check_model(self.model, "the served model")
                self.stale = None
            except CirkitError as e:
                self.stale = f"{e}; restart 'cirkit serve' for the new index"
                log.error("%s", self.stale)

    def info(self) -> dict[str, Any]:
        """Rows, model, search kind and version of the index being served."""
        from cirkit import __version__

        with self.lock:
            self.refresh()
            ann = self.index.uses_ann(self.strategy)
            return {
                "index": self.index.label,
                "table": self.index.table_name,
                "version": self.index.version,
                "rows": self.index.count(),
                "model": self.model.to_dict(),
                "search": "ann" if ann else "exact",
                "ann": self.index.ann_info() if ann else None,
                "columns": self.index.metadata_columns(),
                "max_k": self.max_k,
                "stale": self.stale,
                "cirkit": __version__,
            }

    def image_of(self, item_id: str) -> str:
        """The image path the index stores for ``item_id``; a 404 when the id is not a row."""
        if not item_id or len(item_id) > MAX_ID or any(ord(c) < 32 for c in item_id):
            raise RequestError(404, f"unknown id {item_id[:80]!r}: not in the index")
        with self.lock:
            self.refresh()
            if self._paths_version != self.index.version:
                self._paths.clear()
                self._paths_version = self.index.version
            if item_id in self._paths:
                self._paths.move_to_end(item_id)
                path = self._paths[item_id]
            else:
                quoted = "'" + item_id.replace("'", "''") + "'"  # an SQL string literal: the id cannot end it
                rows = (self.index.table.search().where(f"id = {quoted}").select(["id", "image"]).limit(2)
                        .to_arrow().to_pylist())
                rows = [r for r in rows if r["id"] == item_id]
                path = rows[0]["image"] if rows else None
                self._remember(item_id, path)
        if path is None:
            raise RequestError(404, f"unknown id {item_id[:80]!r}: not in the index")
        return path

    def _remember(self, item_id: str, path: str | None) -> None:
        self._paths[item_id] = path
        while len(self._paths) > PATH_CACHE:
            self._paths.popitem(last=False)

    # -- images ---------------------------------------------------------------------------------
    def _open(self, path: str, what: str):
        """Decode an image file with cirkit's limits; errors name ``what``, never a server path."""
        from cirkit.io.images import open_image

        if "://" in path:
            raise RequestError(404, f"{what}: its image is not a local file ({path.split('://')[0]}://...)")
        try:
            return open_image(path, max_pixels=self.max_pixels, min_side=self.backbone.decode_size)
        except ImageError as e:
            raise RequestError(_image_status(e.reason), f"{what}: {e.reason}") from None

    def decode_upload(self, data: bytes):
        """An uploaded reference as model input (limits of :func:`cirkit.io.open_image`)."""
        if not data:
            raise RequestError(400, "the uploaded file is empty; send an image (JPEG, PNG, WebP, ...)")
        with self._decode:
            # open_image reads files (its limits and EXIF handling live there): the upload goes to a
            # private temp file that only this request knows, removed as soon as it is decoded.
            fd, tmp = tempfile.mkstemp(dir=self._tmp, suffix=".upload")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                return self.transform(self._open(tmp, "the uploaded file"))
            finally:
                os.unlink(tmp)

    def decode_indexed(self, item_id: str):
        """The image of indexed ``item_id`` as model input."""
        path = self.image_of(item_id)
        with self._decode:
            return self.transform(self._open(path, f"the image of id {item_id!r}"))

    def thumbnail(self, item_id: str, size: int = 256) -> bytes:
        """A JPEG of at most ``size`` px a side of an indexed image (cached by path, size and mtime)."""
        if size not in THUMB_SIZES:
            raise RequestError(400, f"size must be one of {', '.join(map(str, THUMB_SIZES))}, got {size}")
        path = self.image_of(item_id)
        try:
            stamp = os.stat(path).st_mtime_ns if "://" not in path else 0
        except OSError:
            raise RequestError(404, f"the image of id {item_id!r} is missing on the server") from None
        key = (path, size, stamp)
        with self._thumb_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        with self._decode:
            im = self._open(path, f"the image of id {item_id!r}")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        with self._thumb_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data

    # -- search ---------------------------------------------------------------------------------
    def check(self, q: Query) -> Query:
        """Refuse what cannot be answered, with a message saying what to send instead."""
        if q.text is not None:
            q.text = q.text.strip() or None
        if q.where is not None:
            q.where = q.where.strip() or None
        if q.reference_id == "":
            q.reference_id = None
        if q.image is not None and q.reference_id is not None:
            raise RequestError(400, "give the reference as an upload (image) or as an indexed id (reference_id), not both")
        if q.image is None and q.reference_id is None and not q.text:
            raise RequestError(400, "nothing to search for: send a reference image, a reference_id, a text, or both")
        if not 1 <= q.k <= self.max_k:
            raise RequestError(400, f"k must be between 1 and {self.max_k}, got {q.k}")
        if q.text and len(q.text) > MAX_TEXT:
            raise RequestError(400, f"text is {len(q.text)} characters; at most {MAX_TEXT}")
        if q.where and len(q.where) > MAX_WHERE:
            raise RequestError(400, f"where is {len(q.where)} characters; at most {MAX_WHERE}")
        if self.stale:
            raise RequestError(503, self.stale)
        return q

    def search(self, q: Query) -> Answer:
        """Answer one query through the batcher (the HTTP path)."""
        t0 = time.perf_counter()
        self.check(q)
        with self.batcher.expecting() as ticket:
            job = self.prepare(q)
            decode_s = time.perf_counter() - t0
            fut = self.batcher.put(job, ticket)
        answer = fut.result()
        answer.timing_ms["decode"] = round(decode_s * 1000, 3)
        answer.timing_ms["total"] = round((time.perf_counter() - t0) * 1000, 3)
        return answer

    def prepare(self, q: Query) -> Job:
        """Decode the reference (upload or indexed id) into a job for the batcher."""
        pixels, exclude = None, []
        if q.image is not None:
            pixels = self.decode_upload(q.image)  # an upload is not in the index: nothing to exclude
        elif q.reference_id is not None:
            pixels = self.decode_indexed(q.reference_id)
            if q.exclude_reference:
                exclude = [q.reference_id]
        return Job(q.kind, pixels, q.text, q.k, q.where, exclude)

    def _run_batch(self, jobs: list[Job]) -> list[Answer | Exception]:
        """Embed the batch (one model call per kind of query), then search it (one call per filter)."""
        import numpy as np

        t0 = time.perf_counter()
        vectors: list[Any] = [None] * len(jobs)
        embed_s: dict[str, float] = {}
        for kind in ("composed", "image", "text"):
            rows = [i for i, j in enumerate(jobs) if j.kind == kind]
            if rows:
                t = time.perf_counter()
                got = self.embed([jobs[i] for i in rows])
                embed_s[kind] = time.perf_counter() - t
                for i, v in zip(rows, got, strict=True):
                    vectors[i] = v
        embedded = time.perf_counter()
        out: list[Answer | Exception] = [RuntimeError("not searched")] * len(jobs)
        with self.lock:
            self.refresh()
            version = self.index.version
            if self._paths_version != version:
                self._paths.clear()
                self._paths_version = version
            groups: dict[str | None, list[int]] = {}
            for i, j in enumerate(jobs):
                groups.setdefault(j.where, []).append(i)
            search_s: dict[str | None, float] = {}
            for where, rows in groups.items():
                t = time.perf_counter()
                k = max(jobs[i].k for i in rows)
                try:
                    if self.stale:
                        raise RequestError(503, self.stale)
                    hits = self.index.search(
                        np.stack([vectors[i] for i in rows]), k=k, where=where, strategy=self.strategy,
                        nprobes=self.nprobes, refine_factor=self.refine_factor,
                        exclude=[jobs[i].exclude for i in rows], metadata=True)
                except RequestError as e:
                    hits = [e] * len(rows)
                except CirkitError as e:  # a filter LanceDB cannot run: the client's to fix
                    err = RequestError(400, str(e).replace("--where ", "where ", 1))
                    hits = [err] * len(rows)
                search_s[where] = time.perf_counter() - t
                for i, h in zip(rows, hits, strict=True):
                    if isinstance(h, Exception):
                        out[i] = h
                        continue
                    h = h[: jobs[i].k]  # the top k of a deeper search is the top k (ties break by row)
                    for hit in h:  # a thumbnail asked for next needs no lookup
                        if hit.id not in self._paths and len(self._paths) < PATH_CACHE:
                            self._paths[hit.id] = hit.image
                    out[i] = Answer(h, version, {}, len(jobs))
        for i, j in enumerate(jobs):
            if isinstance(out[i], Answer):
                out[i].timing_ms.update(
                    queue=round(j.queued_s * 1000, 3),
                    embedding=round(embed_s[j.kind] * 1000, 3),
                    search=round(search_s[j.where] * 1000, 3),
                    batch=round((time.perf_counter() - t0) * 1000, 3),
                )
        log.debug("batch of %d: embedding %.1f ms, search %.1f ms", len(jobs), (embedded - t0) * 1000,
                  (time.perf_counter() - embedded) * 1000)
        return out

    def embed(self, jobs: list[Job]):
        """Query vectors of same-kind jobs in one model call, as ``cirkit query`` embeds each one."""
        import torch

        self.embed_calls += 1
        kind = jobs[0].kind
        with torch.inference_mode():
            batch = self.backbone.collate([j.pixels for j in jobs]) if kind != "text" else None
            texts = [j.text or "" for j in jobs] if kind != "image" else None
            return self.backbone.embed_queries(batch, texts).float().cpu().numpy()


def _image_status(reason: str) -> int:
    """413 for an image refused for its size (it may be fine, just too big here), 404 for a gone file, else 400."""
    if reason == "no such file":
        return 404
    return 413 if ("limit" in reason or "aspect ratio" in reason) else 400
