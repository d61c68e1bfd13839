"""Composed image retrieval against a cirkit index: image + text in, ranked images out.

``run`` returns a :class:`QueryResult`: the stage summary plus ``answers``, one typed
:class:`cirkit.records.Result` per query whose ``hits`` are :class:`cirkit.records.Hit`
records carrying the index's metadata columns. One query (``image`` and/or ``text``)
answers in memory; batch mode reads a ``queries.jsonl`` of :class:`cirkit.records.Query`
and appends one Result per query to ``results.jsonl`` (resumable: ids already written are
skipped; the reference is written as an absolute path, so the file reads the same from any
folder). The query model must be the one that built the index; when no model is given,
the index's own manifest names it. Search goes through :mod:`cirkit.search` only; the
search *strategy* (auto, exact, ann) is ``config.search``, the fusion *mode* ``config.mode``.
Timings (open index, model load, embedding, search) are reported in the JSON summary.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cirkit.config import (
    UsageError,
    batch_size_setting,
    check_settings,
    device_setting,
    num_workers_setting,
    setting,
    strict_setting,
    wait_setting,
)
from cirkit.errors import CirkitError, ImageError
from cirkit.records import EmbeddingManifest, Hit, Result
from cirkit.summary import StageResult, Timer, timed

log = logging.getLogger("cirkit")

BATCH_CHUNK = 256  # queries embedded and written per step, so a killed batch keeps its work
HTML_LIMIT = 100  # queries shown in a batch's contact sheet (and kept in ``answers``)


# The index a bare `cirkit query img.jpg "make it red"` searches (like simonw/llm's env defaults).
INDEX_ENV = "CIRKIT_INDEX"


@dataclass
class QueryConfig:
    """Settings of ``cirkit query``."""

    image: Path | None = setting(None, positional=True, metavar="IMAGE",
                                 help="Reference image (omit for a text-only query).")
    text: str | None = setting(None, positional=True, metavar="TEXT", flag="--text", short="-t",
                               help='Modification text, e.g. "make it red".')
    index: str | None = setting(None, location=True, aliases=("-i",), show_default=f"${INDEX_ENV}",
                                help="Index made by 'cirkit index'.")
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
    batch: Path | None = setting(None, stdio="in", help="queries.jsonl (cirkit Query records) to answer.")
    output: Path = setting(Path("results.jsonl"), short="-o", stdio="out", help="Batch results file.")
    batch_size: int = batch_size_setting(64, "Queries embedded")
    num_workers: int | None = num_workers_setting(0)
    strict: bool = strict_setting()
    wait: bool = wait_setting()
    cache_dir: Path | None = setting(None, cli=False, show_default="beside a local index",
                                     help="Folder of the exact-search vector cache.")

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass
class QueryResult(StageResult):
    """The summary of a query run plus its typed answers.

    ``answers``: the one answer of a single query; in batch mode the first
    :data:`HTML_LIMIT` answered in this run (every answer is in ``results.jsonl``).
    ``to_dict()`` (the ``--json`` boundary) adds a single query's hits under ``details``.
    """

    answers: list[Result] = field(default_factory=list)
    model: EmbeddingManifest | None = None
    single: bool = False

    @property
    def hits(self) -> list[Hit]:
        """The hits of a single query (empty in batch mode)."""
        return self.answers[0].hits if self.single and self.answers else []

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        details = dict(out.get("details", {}))
        if self.model is not None:
            details["model"] = self.model.to_dict()
        if self.single and self.answers:
            a = self.answers[0]
            details["hits"] = [h.to_dict() for h in a.hits]
            details["query"] = {"reference": a.reference, "text": a.text}
        out["details"] = details
        return out


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


def _check(config: QueryConfig) -> None:
    """Refuse settings that cannot work, before loading anything."""
    if not config.index:
        config.index = os.environ.get(INDEX_ENV, "").strip() or None
        if config.index:
            log.info("searching $%s = %s", INDEX_ENV, config.index)
    if not config.index:
        raise UsageError(f"no index given; pass --index INDEX (made by 'cirkit index') or set {INDEX_ENV}=INDEX")
    if config.batch is None and config.image is None and not (config.text or "").strip():
        raise UsageError("nothing to search for: give a reference IMAGE, a --text, both, or --batch queries.jsonl")
    if config.batch is not None and (config.image is not None or config.text):
        raise CirkitError("--batch reads its queries from the file; drop the IMAGE/TEXT arguments")
    if config.image is not None and not Path(config.image).exists():
        raise ImageError(config.image, "no such file")
    check_settings(config)  # ranges and choices (again: a config's fields can change after it is made)
    outputs = {"--html": config.html, "--grid": config.grid}
    if config.batch is not None:
        outputs["--output"] = config.output
    inputs = {"--batch": None if str(config.batch) == "-" else config.batch, "IMAGE": config.image}
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if path is None or str(path) == "-":  # standard input/output is no file to overwrite
            continue
        key = _resolved_path(path)
        clash = next((f for f, p in inputs.items() if p is not None and _resolved_path(p) == key), None) or seen.get(key)
        if clash:
            raise CirkitError(f"{path}: {flag} would overwrite {clash} ({path}); choose another file")
        seen[key] = flag
    _check_outputs(config)


def _outputs(config: QueryConfig) -> list[tuple[Path, str]]:
    """The files this run writes, with what each is (for their locks and messages)."""
    found = [(Path(config.output), "results file")] if config.batch is not None else []
    found += [(Path(p), what) for p, what in ((config.html, "HTML report"), (config.grid, "PNG grid")) if p is not None]
    return found


def _check_outputs(config: QueryConfig) -> None:
    """Each output is a file cirkit may write: not a link, device or folder, and not someone else's file."""
    from cirkit.io.atomic import check_file_output
    from cirkit.io.jsonl import check_output_kind
    from cirkit.report import is_report_html, is_report_png

    owned = {"HTML report": is_report_html, "PNG grid": is_report_png}
    for path, what in _outputs(config):
        check_file_output(path, what, owned.get(what))
    if config.batch is not None:
        check_output_kind(config.output, Result)  # results are appended: resuming a captions file would mix them


def run(config: QueryConfig) -> QueryResult:
    """Answer one query or a batch of queries (see module docstring)."""
    import contextlib

    from cirkit.backbones import load_backbone
    from cirkit.io.lock import output_lock
    from cirkit.search import open_index

    _check(config)
    result = QueryResult("query", single=config.batch is None)
    timer = Timer()
    with timed(result), contextlib.ExitStack() as locks:
        for path, what in _outputs(config):  # one writer per output, for the whole run
            locks.enter_context(output_lock(path, wait=config.wait, what=what))
        with timer("open_index"):
            index = open_index(config.index, config.table, config.cache_dir)
            strategy = "ann" if index.uses_ann(config.search) else "exact"
        with timer("model_load"):
            backbone = load_backbone(spec_for(config, index))
        result.model = backbone.manifest()
        index.check_model(result.model, "the query model")
        if config.batch is not None:
            result.answers = _run_batch(config, index, backbone, timer, result)
        else:
            result.answers = _run_one(config, index, backbone, timer, result)
        _write_reports(config, result, timer)
    result.details.update(
        search=strategy,
        index=str(config.index),
        table=config.table,
        where=config.where,
        columns=index.metadata_columns(),
        timing_s=timer.rounded(),
        timing=timer.line(),
    )
    return result


def _write_reports(config: QueryConfig, result: QueryResult, timer: Timer) -> None:
    if not (config.html or config.grid):
        return
    with timer("report"):
        if config.html:
            from cirkit.report import write_html

            result.outputs["html"] = str(write_html(config.html, result.answers[:HTML_LIMIT]))
        if config.grid:
            from cirkit.report import write_grid

            result.outputs["grid"] = str(write_grid(config.grid, result.answers[:HTML_LIMIT]))


def _search(index, config: QueryConfig, vectors, exclude) -> list[list[Hit]]:
    return index.search(vectors, k=config.k, where=config.where, strategy=config.search, nprobes=config.nprobes,
                        refine_factor=config.refine_factor, exclude=exclude, metadata=True)


def _run_one(config: QueryConfig, index, backbone, timer: Timer, result: QueryResult) -> list[Result]:
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
        hits = _search(index, config, enc.vectors.numpy(), exclude)[0]
    result.counts = {"queries": 1, "hits": len(hits)}
    return [Result(id="query", hits=hits, reference=str(ref) if ref is not None else None, text=text)]


def _run_batch(config: QueryConfig, index, backbone, timer: Timer, result: QueryResult) -> list[Result]:
    from cirkit.encode import encode_queries
    from cirkit.io.jsonl import JsonlAppender, read_records
    from cirkit.records import Query, resolve_path
    from cirkit.summary import make_progress

    batch = Path(config.batch)
    queries = read_records(batch, Query)
    base = batch.parent
    answers: list[Result] = []
    written = resumed = 0
    with JsonlAppender(config.output, record=Result) as out:
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
                    hits = _search(index, config, enc.vectors.numpy(), exclude) if enc.ids else []
                for k, hs in zip(enc.ids, hits, strict=True):
                    ref = _resolved_path(refs[k]) if refs[k] else None
                    rec = Result(id=k, hits=hs, reference=ref, text=by_id[k].text)
                    if out.write(rec):
                        written += 1
                    if len(answers) < HTML_LIMIT:
                        answers.append(rec)
                progress.update(task, advance=len(chunk))
    result.counts = {"queries": len(queries), "written": written, "already_done": resumed}
    result.outputs["results"] = str(config.output)
    return answers
