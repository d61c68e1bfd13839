"""Composed image retrieval against a cirkit index: image + text in, ranked images out.

One query (``image`` and/or ``text``) returns its hits in ``result.details["hits"]``;
batch mode reads a ``queries.jsonl`` of :class:`cirkit.records.Query` and appends one
:class:`cirkit.records.Result` per query to ``results.jsonl`` (resumable: ids already
written are skipped). The query model must be the one that built the index; when no
model is given, the index's own manifest names it. Timings (open index, model load,
embedding, search) are reported in ``result.details["timing_s"]``.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirkit.config import (
    batch_size_setting,
    check_settings,
    device_setting,
    num_workers_setting,
    setting,
    strict_setting,
)
from cirkit.errors import CirkitError, ImageError
from cirkit.summary import StageResult, timed

log = logging.getLogger("cirkit")

BATCH_CHUNK = 256  # queries embedded and written per step, so a killed batch keeps its work
HTML_LIMIT = 100  # queries shown in a batch's contact sheet


@dataclass
class QueryConfig:
    """Settings of ``cirkit query``."""

    image: Path | None = setting(None, positional=True, metavar="IMAGE",
                                 help="Reference image (omit for a text-only query).")
    text: str | None = setting(None, positional=True, metavar="TEXT", flag="--text", short="-t",
                               help='Modification text, e.g. "make it red".')
    index: str | None = setting(None, aliases=("-i",), help="Index made by 'cirkit index'.")
    table: str = setting("images", help="Table name inside the index.")
    model: str | None = setting(None, short="-m", show_default="the index's model",
                                help="Checkpoint folder or model name.")
    backbone: str | None = setting(None, help="clip, vit, mllm or fake.")
    pretrained: str | None = setting(None, help="open_clip pretrained tag (clip).")
    mode: str = setting("composed", help="composed, image, text or sum.")
    device: str | None = device_setting()
    k: int = setting(10, ge=1, flag="--k", short="-k", help="Results per query.")
    where: str | None = setting(None, help='SQL filter on metadata columns, e.g. "year > 2020".')
    exclude_reference: bool = setting(False, flag="--exclude-reference/--keep-reference",
                                      help="Drop the reference image from the results.")
    search: str = setting("auto", choices=("auto", "exact", "ann"), help="How to search the index.")
    nprobes: int | None = setting(None, ge=1, show_default="max(16, 2% of partitions)",
                                  help="ANN partitions probed per query.")
    refine_factor: int | None = setting(None, ge=1, show_default="30", help="ANN: re-rank k*factor candidates exactly.")
    html: Path | None = setting(None, help="Write a self-contained HTML contact sheet.")
    grid: Path | None = setting(None, help="Write a PNG grid of query and results.")
    batch: Path | None = setting(None, help="queries.jsonl (cirkit Query records) to answer.")
    output: Path = setting(Path("results.jsonl"), short="-o", help="Batch results file.")
    batch_size: int = batch_size_setting(64, "Queries embedded")
    num_workers: int | None = num_workers_setting(0)
    strict: bool = strict_setting()
    cache_dir: Path | None = setting(None, cli=False, show_default="beside a local index",
                                     help="Folder of the exact-search vector cache.")

    def __post_init__(self) -> None:
        check_settings(self)


class Timer:
    """Accumulates named wall-clock sections."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def line(self) -> str:
        def fmt(s: float) -> str:
            return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"

        return ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in self.seconds.items())


def spec_for(config: QueryConfig, index) -> Any:
    """The BackboneSpec to embed queries with: the flags, else the index's own manifest."""
    from cirkit.backbones.base import BackboneSpec

    if config.model or config.backbone:
        return BackboneSpec(
            backbone=config.backbone, model=config.model, pretrained=config.pretrained, mode=config.mode, device=config.device
        )
    m = index.manifest
    if m.source:
        model, pretrained = m.source, m.pretrained
    else:  # indexes written before manifests recorded the source
        model, _, pretrained = m.checkpoint.partition("@")
    log.info("no --model given; using the index's model %s %s", m.backbone, m.checkpoint)
    return BackboneSpec(
        backbone=m.backbone, model=model or None, pretrained=pretrained or None, mode=config.mode, device=config.device
    )


def _resolved_path(a: str | Path) -> str:
    return str(Path(a).expanduser().resolve())


def run(config: QueryConfig) -> StageResult:
    """Answer one query or a batch of queries (see module docstring)."""
    from cirkit.backbones import load_backbone
    from cirkit.index import open_index

    result = StageResult("query")
    if not config.index:
        raise CirkitError("no index given; pass --index INDEX (made by 'cirkit index')")
    if config.batch is None and config.image is None and not (config.text or "").strip():
        raise CirkitError("nothing to search for: give a reference IMAGE, a --text, both, or --batch queries.jsonl")
    if config.batch is not None and (config.image is not None or config.text):
        raise CirkitError("--batch reads its queries from the file; drop the IMAGE/TEXT arguments")
    if config.image is not None and not Path(config.image).exists():
        raise ImageError(config.image, "no such file")
    if config.k < 1:
        raise CirkitError(f"--k must be at least 1, got {config.k}")
    if config.batch_size < 1:
        raise CirkitError(f"--batch-size must be at least 1, got {config.batch_size}")
    timer = Timer()
    with timed(result):
        with timer("open_index"):
            index = open_index(config.index, config.table, config.cache_dir)
            mode = "ann" if index.uses_ann(config.search) else "exact"
        with timer("model_load"):
            backbone = load_backbone(spec_for(config, index))
        index.check_model(backbone.manifest(), "the query model")
        if config.batch is not None:
            entries = _run_batch(config, index, backbone, timer, result)
        else:
            entries = _run_one(config, index, backbone, timer, result)
        with timer("report"):
            if config.html:
                from cirkit.report import write_html

                result.outputs["html"] = str(write_html(config.html, entries[:HTML_LIMIT]))
            if config.grid:
                from cirkit.report import write_grid

                result.outputs["grid"] = str(write_grid(config.grid, entries[:HTML_LIMIT]))
        if not (config.html or config.grid):
            timer.seconds.pop("report", None)
    result.details.update(
        search=mode,
        index=str(config.index),
        model=backbone.manifest(),
        timing_s={k: round(v, 4) for k, v in timer.seconds.items()},
        timing=timer.line(),
    )
    return result


def _search_kwargs(config: QueryConfig) -> dict[str, Any]:
    return {
        "k": config.k,
        "where": config.where,
        "mode": config.search,
        "nprobes": config.nprobes,
        "refine_factor": config.refine_factor,
    }


def _run_one(config: QueryConfig, index, backbone, timer: Timer, result: StageResult) -> list[dict[str, Any]]:
    from cirkit.encode import encode_queries

    ref = Path(config.image) if config.image is not None else None
    text = config.text if (config.text or "").strip() else None
    with timer("embedding"):
        enc = encode_queries(backbone, [("query", ref, text)], batch_size=1, num_workers=0, strict=True)
    if not enc.ids:
        reason = enc.failed[0][1] if enc.failed else "could not be embedded"
        raise ImageError(ref or "query", reason)
    exclude = [[_resolved_path(ref)]] if (config.exclude_reference and ref is not None) else None
    with timer("search"):
        hits = index.search(enc.vectors.numpy(), exclude=exclude, **_search_kwargs(config))[0]
    entry = {
        "id": "query",
        "reference": str(ref) if ref is not None else None,
        "text": text,
        "hits": [h.to_dict() for h in hits],
    }
    result.counts = {"queries": 1, "hits": len(hits)}
    result.details["hits"] = entry["hits"]
    result.details["query"] = {"reference": entry["reference"], "text": text}
    return [entry]


def _run_batch(config: QueryConfig, index, backbone, timer: Timer, result: StageResult) -> list[dict[str, Any]]:
    from cirkit.encode import encode_queries
    from cirkit.io.jsonl import JsonlAppender, read_records
    from cirkit.records import Query, Result, resolve_path
    from cirkit.summary import make_progress

    batch = Path(config.batch)
    queries = read_records(batch, Query)
    base = batch.parent
    entries: list[dict[str, Any]] = []
    written = resumed = 0
    with JsonlAppender(config.output) as out:
        todo = [q for q in queries if q.id not in out]
        resumed = len(queries) - len(todo)
        if resumed:
            log.info("%s: %d of %d queries already answered; resuming", config.output, resumed, len(queries))
        with make_progress() as progress:
            task = progress.add_task("searching", total=len(todo), rate="")
            for s in range(0, len(todo), BATCH_CHUNK):
                chunk = todo[s : s + BATCH_CHUNK]
                refs = {q.id: (resolve_path(q.reference, base) if q.reference else None) for q in chunk}
                with timer("embedding"):
                    enc = encode_queries(
                        backbone,
                        [(q.id, refs[q.id], q.text) for q in chunk],
                        batch_size=config.batch_size,
                        num_workers=config.num_workers,
                        strict=config.strict,
                    )
                for key, reason in enc.failed:
                    result.skip(key, reason)
                by_id = {q.id: q for q in chunk}
                exclude = None
                if config.exclude_reference:
                    exclude = [
                        [x for x in (by_id[k].reference_id, _resolved_path(refs[k]) if refs[k] else None) if x]
                        for k in enc.ids
                    ]
                with timer("search"):
                    hits = index.search(enc.vectors.numpy(), exclude=exclude, **_search_kwargs(config)) if enc.ids else []
                for k, hs in zip(enc.ids, hits, strict=True):
                    q = by_id[k]
                    rec = Result(id=k, hits=[h.to_dict() for h in hs], reference=q.reference, text=q.text)
                    if out.write(rec):
                        written += 1
                    if len(entries) < HTML_LIMIT:
                        entries.append(
                            {"id": k, "reference": str(refs[k]) if refs[k] else None, "text": q.text, "hits": rec.hits}
                        )
                progress.update(task, advance=len(chunk))
    result.counts = {"queries": len(queries), "written": written, "already_done": resumed}
    result.outputs["results"] = str(config.output)
    return entries
