"""``evaluate``: score a backbone on FashionIQ, CIRR, CIRCO, GeneCIS, a generic folder or synth.

The benchmark adapter (:mod:`cirkit.evaluate`) turns the official annotation files into
tasks; here every gallery image is embedded once (shared by all tasks and query modes),
each query mode embeds the queries, :func:`cirkit.retrieval.topk` ranks exactly, and the
pure functions in :mod:`cirkit.metrics` score the rankings.

``metrics.json`` is one flat object::

    "<mode>/<split>/<metric>": float           split-level numbers (e.g. "composed/val/R@1")
    "<mode>/<split>/<task>/<metric>": float    per task, when a split has several
                                               (FashionIQ categories, GeneCIS tasks)
    "<any of those keys>/ci95": [lo, hi]       95 % bootstrap interval (``--bootstrap N``
                                               resamples of the queries, seeded)
    "bootstrap/samples", "bootstrap/seed"
    "primary_metric": "<mode>/<split>/<metric>"
    "protocol/<switch>": value                 what changes the numbers (exclusions, joins, ties)
    "benchmark", "splits", "modes", "backbone", "checkpoint", "dim", "model", "pretrained",
    "data", "images", "count/<split>/queries", "count/<split>/gallery", "cirkit"

Metrics are percentages (0-100). Queries whose reference image cannot be read are left
out of the scores and listed as skipped (``--strict`` makes that fatal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirkit.config import (
    allow_pickle_setting,
    batch_size_setting,
    check_settings,
    device_setting,
    gpu_decode_setting,
    num_workers_setting,
    precision_setting,
    setting,
    strict_setting,
    wait_setting,
)
from cirkit.errors import CirkitError
from cirkit.summary import StageResult, timed

log = logging.getLogger("cirkit")

SUBMISSION_DEPTH = 50


@dataclass
class EvaluateConfig:
    """Settings of ``cirkit evaluate`` (recipe section ``evaluate``)."""

    benchmark: str | None = setting(None, positional=True, metavar="BENCHMARK", show_default="detected from --data",
                                    help="fashioniq, cirr, circo, genecis, generic or synth.")
    data: Path | None = setting(None, short="-d", help="Annotation root or benchmark folder.")
    images: Path | None = setting(None, aliases=("-i",), show_default="--data", help="Image root.")
    split: list[str] | None = setting(None, short="-s", show_default="the benchmark's val/test splits",
                                      help="Splits to evaluate (repeat or comma-separate).")
    backbone: str | None = setting(None, aliases=("-b",),
                                   help="clip, vit, mllm or fake (a checkpoint folder names its own).")
    model: str | None = setting(None, short="-m", help="open_clip model name, or a cirkit checkpoint folder.")
    pretrained: str | None = setting(None, help="open_clip pretrained tag or a local .safetensors file.")
    mode: list[str] | None = setting(None, show_default="composed",
                                     help="Query modes: composed, image, text, sum; repeat to compare in one run.")
    batch_size: int = batch_size_setting(64, "Images")
    num_workers: int | None = num_workers_setting(show_default="min(4, cores-1)")
    device: str | None = device_setting()
    precision: str | None = precision_setting()
    strict: bool = strict_setting()
    submission: Path | None = setting(None, help="Folder for test-server files (CIRR, CIRCO) or rankings (others).")
    output: Path | None = setting(None, short="-o", help="Write metrics.json here.")
    caption_join: str | None = setting(None, choices=("and", "first", "second"), show_default="and",
                                       help="FashionIQ captions: and ('c1 and c2'), first, second.")
    exclude_reference: bool | None = setting(
        None, flag="--exclude-reference/--keep-reference", show_default="the benchmark's protocol",
        help="Remove each query's reference from its ranking.")
    allow_pickle: bool = allow_pickle_setting()
    wait: bool = wait_setting()
    chunk_size: int = setting(256, ge=1, cli=False, help="Queries ranked per matrix product.")
    bootstrap: int = setting(1000, ge=0, help="Resamples of the queries for a 95% confidence interval of every "
                                               "metric (metrics.json '<key>/ci95', the table); 0 = none.")
    bootstrap_seed: int = setting(0, ge=0, help="Seed of the bootstrap resampling (same seed, same intervals).")
    gpu_decode: str = gpu_decode_setting()

    def __post_init__(self):
        if isinstance(self.mode, str):
            self.mode = [self.mode]
        if isinstance(self.split, str):
            self.split = [self.split]
        check_settings(self)
        from cirkit.backbones.base import QUERY_MODES

        for m in self.mode or []:
            if m not in QUERY_MODES:
                raise CirkitError(f"unknown query mode {m!r}; choose from {', '.join(QUERY_MODES)}")

    @property
    def modes(self) -> list[str]:
        return list(dict.fromkeys(self.mode or ["composed"]))


def is_metrics(path: Path) -> bool:
    """Whether ``path`` is a metrics.json cirkit wrote (which a new evaluation may replace)."""
    from cirkit.io.atomic import read_small_json

    obj = read_small_json(path)
    return isinstance(obj, dict) and "cirkit" in obj and "primary_metric" in obj


def _check_outputs(config: EvaluateConfig) -> None:
    """Before any work: ``-o`` is a metrics file cirkit may write, ``--submission`` a folder."""
    from cirkit.io.atomic import check_file_output

    if config.output is not None:
        check_file_output(config.output, "metrics file", is_metrics)
    sub = config.submission
    if sub is not None and Path(sub).exists() and not Path(sub).is_dir():
        raise CirkitError(f"{sub}: --submission is a folder, but a file is here; choose a folder path")


def _locks(config: EvaluateConfig, proc) -> contextlib.ExitStack:
    """One writer at a time for metrics.json and for the submission folder, for the whole run
    (held by the main process: under accelerate launch it alone writes them)."""
    from cirkit.io.lock import output_lock

    stack = contextlib.ExitStack()
    if not proc.is_main:
        return stack
    with stack:
        if config.output is not None:
            stack.enter_context(output_lock(config.output, wait=config.wait, what="metrics file"))
        if config.submission is not None:
            stack.enter_context(output_lock(config.submission, wait=config.wait, what="submission folder"))
        return stack.pop_all()


def run(config: EvaluateConfig, backbone=None) -> StageResult:
    """Evaluate; returns a StageResult whose ``metrics`` is the metrics.json object.

    Under ``accelerate launch`` every process embeds its share of the gallery and of the queries
    (:func:`cirkit.encode.encode_images` with the process info) and receives all vectors; the
    ranking and the metrics are then those of one process, and only the main process writes
    ``metrics.json`` and the submission files.
    """
    from cirkit.device import process_info
    from cirkit.evaluate import load_benchmark

    _check_outputs(config)
    proc = process_info()
    result = StageResult("evaluate")
    with timed(result), _locks(config, proc):
        bench = load_benchmark(
            config.benchmark, config.data, config.images,
            caption_join=config.caption_join, exclude_reference=config.exclude_reference,
        )
        splits = list(dict.fromkeys(config.split or bench.default_splits()))
        loaded = [(split, task) for split in splits for task in bench.load(split)]
        for item, reason in getattr(bench, "skipped_tasks", []):
            result.skip(item, reason)
        if config.submission is None and not any(t.has_ground_truth for _, t in loaded):
            raise CirkitError(
                f"{bench.name} split {', '.join(splits)} has no ground truth; pass --submission DIR to write "
                "the rankings / test-server files"
            )
        metrics, rows = _evaluate(bench, splits, loaded, config, result, backbone, proc)
        result.metrics = metrics
        result.details["rows"] = rows
        if proc.world > 1:
            result.details["processes"] = proc.world
        if config.output is not None and proc.is_main:
            from cirkit.io import atomic_write_json

            atomic_write_json(config.output, metrics, kind="metrics file", owned=is_metrics)
            result.outputs["metrics"] = str(config.output)
        if config.submission is not None:
            result.outputs["submission"] = str(config.submission)
    return result


def _evaluate(bench, splits, loaded, config: EvaluateConfig, result: StageResult, backbone, proc=None):
    import torch

    from cirkit import __version__
    from cirkit.encode import encode_queries

    modes = config.modes
    backbone = backbone if backbone is not None else _load_backbone(config, modes[0], proc)
    base_spec = backbone.spec

    gal, paths = _encode_gallery(loaded, backbone, config, result, proc)
    row_of = gal.row_of()
    qitems, qkey = _query_items(loaded)

    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    want_depth = SUBMISSION_DEPTH if config.submission is not None else 0
    for mi, mode in enumerate(modes):
        backbone.spec = dataclasses.replace(base_spec, mode=mode)
        usable = _answerable(mode, qitems, loaded, metrics)
        qenc = encode_queries(backbone, usable, config.batch_size, config.num_workers, config.strict,
                              description=f"embedding queries ({mode})", proc=proc, gpu_decode=config.gpu_decode)
        if mi == 0:
            for key, reason in qenc.failed:
                result.skip(key.split("\x1f", 1)[1], f"reference image: {reason}")
        qrow = qenc.row_of()
        per_split: dict[str, dict[str, dict[str, list[float]]]] = {}  # split -> task -> metric -> per query
        for n, (split, task) in enumerate(loaded):
            gids = [g for g, p in task.gallery.items() if str(p) in row_of]
            gvec = gal.vectors[[row_of[str(task.gallery[g])] for g in gids]] if gids else torch.empty(0, backbone.dim)
            qs = [q for q in task.queries if qkey[(n, q.id)] in qrow]
            qvec = qenc.vectors[[qrow[qkey[(n, q.id)]] for q in qs]] if qs else torch.empty(0, backbone.dim)
            ranked = rank_task(task, gids, gvec, qs, qvec, max(task.depth(), want_depth), config.chunk_size)
            if task.has_ground_truth:
                per_split.setdefault(split, {})[task.name] = query_scores(task, qs, ranked)
            if config.submission is not None and (proc is None or proc.is_main):
                folder = Path(config.submission) / (mode if len(modes) > 1 else "")
                folder.mkdir(parents=True, exist_ok=True)
                bench.write_submission(split, task, ranked, folder)
            if mi == 0:
                metrics[f"count/{split}/queries"] = metrics.get(f"count/{split}/queries", 0) + len(qs)
                metrics[f"count/{split}/gallery"] = metrics.get(f"count/{split}/gallery", 0) + len(gids)
        for split, scores in per_split.items():
            rows.append(_score_split(bench, mode, split, scores, config, metrics))
    backbone.spec = base_spec

    scored = [s for s in splits if any(r["split"] == s for r in rows)]
    out: dict[str, Any] = {}
    out.update({k: v for k, v in metrics.items() if not k.startswith("count/")})
    out["primary_metric"] = f"{modes[0]}/{scored[0]}/{bench.primary_metric(scored[0])}" if scored else None
    out["benchmark"] = bench.name
    out["splits"] = splits
    out["modes"] = modes
    for k, v in {**bench.protocol(), "ranking": "exact", "global_ties": "gallery order",
                 "candidate_ties": "pessimistic"}.items():
        out[f"protocol/{k}"] = v
    manifest = backbone.manifest()
    out["backbone"] = manifest.backbone
    out["checkpoint"] = manifest.checkpoint
    out["dim"] = manifest.dim
    out["model"] = base_spec.model
    out["pretrained"] = base_spec.pretrained
    out["data"] = str(Path(config.data).resolve())
    out["images"] = str(Path(config.images).resolve()) if config.images is not None else None
    out.update({k: v for k, v in metrics.items() if k.startswith("count/")})
    if config.bootstrap:
        out["bootstrap/samples"], out["bootstrap/seed"] = int(config.bootstrap), int(config.bootstrap_seed)
    out["cirkit"] = __version__
    result.counts["queries"] = sum(len(t.queries) for _, t in loaded)
    result.counts["gallery_images"] = len(paths)
    result.counts["modes"] = len(modes)
    return out, rows


def _answerable(mode: str, qitems: list, loaded: list, metrics: dict[str, Any]) -> list:
    """The queries ``mode`` can answer; the others are left out of its scores, counted per split.

    ``image`` needs a reference and ``text`` a text: answering a text-only query in ``image``
    mode with its text (as the backbone's fallback did) flattered the image-only row. The
    count is ``count/<split>/<mode>/left_out`` in metrics.json.
    """
    from cirkit.backbones.base import needs, query_fits

    usable, left = [], {}
    for item in qitems:
        key, ref, text = item
        if query_fits(mode, ref is not None, [text or ""]):
            usable.append(item)
        else:
            split = loaded[int(key.split("\x1f", 1)[0])][0]
            left[split] = left.get(split, 0) + 1
    for split, n in left.items():
        metrics[f"count/{split}/{mode}/left_out"] = n
        log.warning("%s split, mode %s: %d queries without %s are left out of its scores", split, mode, n, needs(mode))
    return usable


def _load_backbone(config: EvaluateConfig, mode: str, proc):
    """The backbone the config names, on this process's device under accelerate launch."""
    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec

    return load_backbone(BackboneSpec(
        backbone=config.backbone, model=config.model, pretrained=config.pretrained, mode=mode,
        device=config.device or (proc.device if proc is not None else None), precision=config.precision,
        allow_pickle=config.allow_pickle,
    ))


def _encode_gallery(loaded, backbone, config: EvaluateConfig, result: StageResult, proc):
    """Every gallery image embedded once, whatever the number of tasks and modes (a share per process)."""
    from cirkit.encode import encode_images

    paths: dict[str, Any] = {}
    for _, task in loaded:
        for p in task.gallery.values():
            paths.setdefault(str(p), p)  # a path, or a dataset row's image (named <dataset>#<id>)
    gal = encode_images(backbone, list(paths.items()), config.batch_size, config.num_workers, config.strict,
                        description="embedding gallery", proc=proc, gpu_decode=config.gpu_decode)
    for key, reason in gal.failed:
        result.skip(key, reason)
    return gal, paths


def _query_items(loaded) -> tuple[list[tuple[str, Any, str | None]], dict[tuple[int, str], str]]:
    """``(key, reference image, text)`` of every task's queries, keyed by task so ids may repeat across tasks."""
    qitems, qkey = [], {}
    for n, (_split, task) in enumerate(loaded):
        for q in task.queries:
            key = f"{n}\x1f{q.id}"
            qkey[(n, q.id)] = key
            ref = q.reference
            qitems.append((key, Path(ref) if isinstance(ref, str) else ref, q.text))  # a path, or a dataset image
    return qitems, qkey


def rank_task(task, gids: list[str], gvec, queries: list, qvec, depth: int, chunk_size: int = 256):
    """Rank one task's queries: global top-``depth``, subset rankings, per-query galleries."""
    import torch

    from cirkit.evaluate.base import Ranked
    from cirkit.retrieval import rank_of, topk

    gidx = {g: i for i, g in enumerate(gids)}
    ranked = Ranked(ids={}, scores={})
    if not queries or not gids:
        return ranked
    if task.per_query_gallery:
        for i, q in enumerate(queries):
            cands = [c for c in dict.fromkeys(q.candidates or []) if c in gidx]
            if not cands:
                ranked.ids[q.id], ranked.scores[q.id] = [], []
                ranked.target_ranks[q.id] = 10**9
                continue
            s = _scores(gvec[[gidx[c] for c in cands]], qvec[i])
            order = torch.argsort(s, descending=True, stable=True).tolist()
            ranked.ids[q.id] = [cands[j] for j in order]
            ranked.scores[q.id] = [float(s[j]) for j in order]
            tpos = [cands.index(t) for t in q.targets if t in cands]
            ranked.target_ranks[q.id] = min((rank_of(s, j, pessimistic=True) for j in tpos), default=10**9)
        return ranked

    exclude = None
    if task.exclude_reference:
        exclude = [[gidx[q.reference_id]] if q.reference_id in gidx else [] for q in queries]
    idx, val = topk(qvec, gvec, depth + (1 if exclude else 0), exclude=exclude, chunk_size=chunk_size)
    for i, q in enumerate(queries):
        keep = [(int(j), float(v)) for j, v in zip(idx[i], val[i], strict=True) if v != float("-inf")][:depth]
        ranked.ids[q.id] = [gids[j] for j, _ in keep]
        ranked.scores[q.id] = [v for _, v in keep]
    if task.subset_ks:
        for i, q in enumerate(queries):
            members = [m for m in dict.fromkeys(q.subset or []) if m in gidx]
            if task.exclude_reference:
                members = [m for m in members if m != q.reference_id]
            members.sort(key=gidx.__getitem__)  # ties go to the gallery order, as in the global ranking
            if not members:
                ranked.subset[q.id] = []
                continue
            s = _scores(gvec[[gidx[m] for m in members]], qvec[i])
            order = torch.argsort(s, descending=True, stable=True).tolist()
            ranked.subset[q.id] = [members[j] for j in order]
    return ranked


def _scores(rows, q):
    """Row-wise dot products computed the same way for every row, so duplicate images tie exactly."""
    return (rows * q).sum(dim=1)


def _score_split(bench, mode: str, split: str, scores: dict[str, dict[str, list[float]]], config: EvaluateConfig,
                 metrics: dict[str, Any]) -> dict[str, Any]:
    """One mode's split: per-task means, the benchmark's summary and their bootstrap intervals
    into ``metrics``; returns the table row."""
    from cirkit import metrics as M

    per_task = {t: {m: M.mean(v) for m, v in ms.items()} for t, ms in scores.items()}
    summary = bench.aggregate(split, per_task)
    ci, task_ci = M.bootstrap_ci(scores, lambda rep: bench.aggregate(split, rep), config.bootstrap,
                                 config.bootstrap_seed) if config.bootstrap else ({}, {})
    prefix = f"{mode}/{split}"
    for name, value in summary.items():
        metrics[f"{prefix}/{name}"] = round(float(value), 4)
        if name in ci:
            metrics[f"{prefix}/{name}/ci95"] = [round(x, 4) for x in ci[name]]
    if len(per_task) > 1:
        for tname, tm in per_task.items():
            for name, value in tm.items():
                metrics[f"{prefix}/{tname}/{name}"] = round(float(value), 4)
                if name in task_ci.get(tname, {}):
                    metrics[f"{prefix}/{tname}/{name}/ci95"] = [round(x, 4) for x in task_ci[tname][name]]
    many = len(per_task) > 1
    return {"mode": mode, "split": split, "metrics": summary, "tasks": per_task if many else {},
            "ci": ci, "task_ci": task_ci if many else {}}


def query_scores(task, queries: list, ranked) -> dict[str, list[float]]:
    """Each of the task's metrics as one score per query (its mean is the metric), over the
    queries that have targets and were ranked (:mod:`cirkit.metrics`' ``*_scores``)."""
    from cirkit import metrics as M

    qs = [q for q in queries if q.targets and q.id in ranked.ids]
    out: dict[str, list[float]] = {}
    if not qs:
        return out
    lists = [ranked.ids[q.id] for q in qs]
    if task.candidate_ks:
        ranks = [ranked.target_ranks[q.id] for q in qs]
        for k in task.candidate_ks:
            out[f"R@{k}"] = M.rank_scores(ranks, k)
        return out
    first = [q.targets[:1] if task.recall_first_target_only else q.targets for q in qs]
    for k in task.recall_ks:
        out[f"R@{k}"] = M.recall_scores(lists, first, k)
    for k in task.map_ks:
        out[f"mAP@{k}"] = M.ap_scores(lists, [q.targets for q in qs], k)
    if task.subset_ks:
        sub = [ranked.subset.get(q.id, []) for q in qs]
        excl = [[q.reference_id] if task.exclude_reference and q.reference_id else [] for q in qs]
        for k in task.subset_ks:
            out[f"Rs@{k}"] = M.recall_subset_scores(sub, [q.targets for q in qs], [q.subset or [] for q in qs], k, excl)
    return out


def score_task(task, queries: list, ranked) -> dict[str, float]:
    """The task's metrics over its queries that have targets and were ranked."""
    from cirkit import metrics as M

    return {name: M.mean(v) for name, v in query_scores(task, queries, ranked).items()}
