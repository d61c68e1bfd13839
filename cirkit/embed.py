"""``embed``: gallery images -> a resumable Lance embeddings store, through any backbone.

Images are decoded and transformed in DataLoader workers (:func:`cirkit.encode.iter_image_batches`),
embedded under ``torch.inference_mode`` and appended batch by batch to
:class:`cirkit.io.embeddings.EmbeddingStore`, so a killed run keeps every finished batch
and a re-run embeds only the ids not stored yet. Unreadable images are skipped and
counted (``strict`` makes the first one fatal).

Inputs: a folder of images, a gallery.jsonl, or a Hugging Face dataset (:mod:`cirkit.io.datasets`;
``streaming`` for collections that do not fit on disk). Output: a local ``NAME.lance`` or a
LanceDB URI on object storage (``s3://bucket/NAME.lance``, ``storage_options``).

The same command runs under ``accelerate launch --num_processes N [--num_machines M ...]``:
each process embeds its share of the ids (:func:`cirkit.device.my_share`; a dataset is split by
``datasets.distributed.split_dataset_by_node``), writes its rows as Lance fragments and
journals them, and the main process commits every fragment in one Lance commit at the end
(:class:`cirkit.io.embeddings.FragmentWriter`, :func:`~cirkit.io.embeddings.commit_fragments`).
A kill of any process loses at most ``fragment_rows`` rows per process; the next run (any
number of processes) first commits what the journals hold, then continues every shard.
One process (the default) appends through LanceDB directly, one commit per batch, as before;
with ``fragment_rows`` set it writes fragments too (far fewer table versions on a long run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirkit.config import (
    UsageError,
    allow_pickle_setting,
    batch_size_setting,
    check_settings,
    device_setting,
    gpu_decode_setting,
    num_workers_setting,
    precision_setting,
    setting,
    strict_setting,
    trust_remote_code_setting,
    wait_setting,
)
from cirkit.errors import CirkitError
from cirkit.io.datasets import (
    DatasetOptions,
    dataset_split_setting,
    id_column_setting,
    image_column_setting,
    input_format_setting,
    is_dataset,
    streaming_setting,
)
from cirkit.io.storage import storage_options_setting
from cirkit.summary import StageResult, timed

FRAGMENT_ROWS = 8192  # rows per fragment under accelerate launch: ~16-32 MB of vectors, a few seconds of work


@dataclass
class EmbedConfig:
    """Settings of ``cirkit embed`` (recipe section ``embed``)."""

    input: Path | None = setting(None, positional=True, metavar="IMAGES", stdio="in",
                                help="A folder of images, a gallery.jsonl, or a dataset (parquet, webdataset .tar, "
                                     "save_to_disk folder, hub id).")
    output: str | None = setting(None, location=True, short="-o", help="Embeddings store to write or extend: NAME.lance, "
                                                        "or a URI such as s3://bucket/NAME.lance.")
    backbone: str | None = setting(None, help="clip, vit, mllm or fake (a checkpoint folder names its own).")
    model: str | None = setting(None, short="-m", help="Checkpoint folder, open_clip name or hub id.")
    pretrained: str | None = setting(None, help="open_clip weights tag or file (clip).")
    batch_size: int = batch_size_setting(64, "Images")
    num_workers: int | None = num_workers_setting(show_default="min(4, cores-1)")
    device: str | None = device_setting()
    precision: str | None = precision_setting()
    strict: bool = strict_setting()
    allow_pickle: bool = allow_pickle_setting()
    trust_remote_code: bool = trust_remote_code_setting()
    sync: bool = setting(False, help="Also remove stored ids whose image is not in IMAGES any more (keep a store "
                                     "in step with a folder; changed files are re-embedded either way).")
    wait: bool = wait_setting()
    gpu_decode: str = gpu_decode_setting()
    fragment_rows: int | None = setting(
        None, ge=1, show_default="8192 under accelerate launch; one process commits every batch",
        help="Rows per Lance fragment a process writes and journals, committed once at the end (a killed process "
             "loses at most this many). Set it for a large one-process run: far fewer table versions.")
    storage_options: str | None = storage_options_setting()
    image_column: str | None = image_column_setting()
    id_column: str | None = id_column_setting()
    dataset_split: str | None = dataset_split_setting()
    streaming: bool = streaming_setting()
    input_format: str = input_format_setting()

    def __post_init__(self) -> None:
        if isinstance(self.output, Path):  # a path from Python callers; a URI stays text
            self.output = str(self.output)
        check_settings(self)


def gallery_items(source: str | Path, skipped: list[tuple[str, str]] | None = None) -> list[tuple[str, Path]]:
    """``(id, image path)`` from a folder of images or a gallery.jsonl (paths relative to it).

    With ``skipped``, a folder's files that cannot become an id (a name that is not UTF-8) are
    listed there instead of stopping the run: one such file must not block the whole folder.
    """
    from cirkit.io import list_images, read_records
    from cirkit.records import GalleryItem, resolve_path

    source = Path(source)
    if source.is_dir():
        return [(key, p.resolve()) for key, p in list_images(source, skipped)]
    if source.suffix == ".jsonl" or str(source) == "-":
        base = source.parent if str(source) != "-" else Path.cwd()
        return [(r.id, resolve_path(r.image, base).resolve()) for r in read_records(source, GalleryItem)]
    if not source.exists():
        raise CirkitError(f"{source}: no such folder or file")
    raise CirkitError(f"{source}: expected a folder of images, a gallery.jsonl or a dataset")


def _check(config: EmbedConfig) -> dict[str, str] | None:
    """Refuse settings that cannot work before any work starts; returns the storage options."""
    from cirkit.io.atomic import check_utf8_path
    from cirkit.io.embeddings import store_location
    from cirkit.io.storage import is_local, local_path, parse_storage_options

    if config.input is None:
        raise UsageError("nothing to embed: pass IMAGES_DIR, gallery.jsonl or a dataset")
    if config.output is None:
        raise UsageError("no output: pass -o gallery.lance")
    if config.batch_size < 1:
        raise CirkitError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.num_workers is not None and config.num_workers < 0:
        raise CirkitError(f"--num-workers must be at least 0, got {config.num_workers}")
    options = parse_storage_options(config.storage_options)
    store_location(config.output)
    if is_local(config.output):
        if Path(config.input).resolve() == local_path(config.output).resolve():
            raise CirkitError(f"{config.output}: is also the input; write the embeddings to another path (-o)")
        check_utf8_path(config.output, "embeddings store")
    return options


def _sync(store, items: list[tuple[str, Path]], config: EmbedConfig) -> tuple[int, int]:
    """Drop the rows to embed again (their file changed, or the id now names another file) and, with
    ``sync``, the rows whose id is not in ``items``; returns (changed, removed)."""
    import logging

    changed = store.stale(items)
    store.remove(changed)  # embedded again below; a kill in between re-embeds them on the next run
    present = {k for k, _ in items}
    vanished = sorted(k for k in store.done if k not in present)
    if vanished and not config.sync:
        logging.getLogger("cirkit").info("%s: %d stored ids have no image in %s (e.g. %s); --sync removes them",
                                         config.output, len(vanished), config.input, vanished[0])
        vanished = []
    return len(changed), store.remove(vanished)


def run(config: EmbedConfig, backbone=None) -> StageResult:
    """Embed the gallery into ``config.output``; ``backbone`` overrides loading one from the config.

    The store is written under its single-writer lock for the whole run: a second ``embed``
    on the same store fails at once naming this one (or waits, with ``wait``).
    """
    from cirkit.device import process_info

    storage = _check(config)
    proc = process_info()
    if config.sync and proc.world > 1:
        raise UsageError("--sync compares the store with the whole folder: run it in one process")
    result = StageResult("embed")
    with timed(result):
        unlisted: list[tuple[str, str]] = []
        source = _source(config, proc, None if config.strict else unlisted)
        if not source and unlisted:  # nothing at all to embed: say why, not an empty store
            raise CirkitError(f"{unlisted[0][0]}: {unlisted[0][1]}")
        with _locked(config, proc):
            _embed(config, source, backbone, storage, proc, result)
        for item, reason in unlisted:
            result.skip(item, reason)
        result.counts["failed"] += len(unlisted)
        result.counts["images"] += len(unlisted)
    embedded = result.counts["embedded"]
    if embedded and result.seconds:
        result.metrics["images_per_s"] = round(embedded / result.seconds, 2)
    return result


@contextlib.contextmanager
def _locked(config: EmbedConfig, proc: Any) -> Iterator[None]:
    """The store's single-writer lock, held by the main process (the one that creates and commits)."""
    from cirkit.io.lock import output_lock
    from cirkit.io.storage import lock_path

    with contextlib.ExitStack() as stack:
        if proc.is_main:
            stack.enter_context(output_lock(lock_path(config.output), wait=config.wait, what="embeddings store"))
        yield


def _source(config: EmbedConfig, proc: Any, skipped: list[tuple[str, str]] | None = None,
            ) -> list[tuple[str, Any]] | DatasetOptions:
    """This process's ``(id, image)`` items, or the dataset options of a stream (opened once the done ids are known)."""
    from cirkit.device import my_share

    options = DatasetOptions.of(config)
    if is_dataset(config.input, options):
        if options.streaming:
            return options
        from cirkit.io.datasets import image_items

        return image_items(config.input, options, proc.rank, proc.world)
    return my_share(gallery_items(config.input, skipped), proc)


def _open_store(config: EmbedConfig, manifest, storage, proc: Any):
    """The store, created by the main process, with every journaled fragment committed before anyone reads it."""
    from cirkit.io.embeddings import EmbeddingStore

    store = EmbeddingStore.open_for_append(config.output, manifest, storage) if proc.is_main else None
    proc.wait()
    if store is None:
        store = EmbeddingStore.open_for_append(config.output, manifest, storage, create=False)
    if _commit_journals(store, proc):
        store = EmbeddingStore.open_for_append(config.output, manifest, storage, create=False)
    return store


def _commit_journals(store, proc: Any) -> int:
    """Commit the fragments every machine's journal holds (main process), then clear the journals; returns rows.

    The first process of each machine reads its machine's journal folder; the entries travel to
    the main process over the process group, so machines need not share a file system.
    """
    from cirkit.io.embeddings import clear_journal, commit_fragments, journal_entries

    mine = journal_entries(store.path) if proc.is_local_main else []
    every = proc.gather(mine)
    rows = commit_fragments(store, [e for share in every for _, e in share]) if proc.is_main else 0
    rows = proc.broadcast(rows)
    proc.wait()  # committed before any journal goes
    clear_journal([f for f, _ in mine])
    return rows


def _embed(config: EmbedConfig, source, backbone, storage, proc: Any, result: StageResult) -> None:
    """Open (or create) the store and append the embeddings of the items not stored yet (under its lock).

    A store this run created and never wrote a row to is removed again when the run fails.
    """
    import dataclasses

    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec
    from cirkit.io.storage import is_local, local_path

    if backbone is None:
        backbone = load_backbone(BackboneSpec(
            backbone=config.backbone, model=config.model, pretrained=config.pretrained, mode="composed",
            device=config.device or proc.device, precision=config.precision,
            trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle,
        ))
    # the gallery side of the model: image embeddings, whatever the query mode
    manifest = dataclasses.replace(backbone.manifest(), normalized=True, mode="image", count=None)
    local = is_local(config.output)
    created = proc.is_main and local and not local_path(config.output).exists()
    store = _open_store(config, manifest, storage, proc)
    try:
        _append(config, source, backbone, store, proc, result)
    except BaseException:
        if created and not store.done and proc.world == 1:  # ours, and empty: a failed first run leaves nothing
            import shutil

            shutil.rmtree(local_path(config.output), ignore_errors=True)
        raise


def _append(config: EmbedConfig, source, backbone, store, proc: Any, result: StageResult) -> None:
    """Embed the items ``store`` does not hold yet: batch by batch (one commit each), or as journaled
    fragments committed once (several processes, or ``fragment_rows``)."""
    import torch

    from cirkit.encode import decoded_batches, default_workers
    from cirkit.io.datasets import ImageStream
    from cirkit.io.embeddings import FragmentWriter
    from cirkit.summary import Rate, make_progress

    changed = removed = 0
    if isinstance(source, DatasetOptions):
        todo: Any = ImageStream(str(config.input), source, proc.rank, proc.world, frozenset(store.done))
        total, stored = None, 0
        name = lambda key: f"{config.input}#{key}"  # noqa: E731 (how the store names a streamed row's image)
    else:
        if proc.world == 1:  # changed files and (with --sync) vanished ones: one process sees the whole folder
            changed, removed = _sync(store, source, config)
        todo = [(k, p) for k, p in source if k not in store.done]
        total, stored = len(source), len(source) - len(todo)
        name = dict((k, str(p)) for k, p in todo).__getitem__  # a file path, or <dataset>#<id>
    fragments = proc.world > 1 or config.fragment_rows is not None
    writer = FragmentWriter(store, proc.rank, config.fragment_rows or FRAGMENT_ROWS) if fragments else store
    workers = default_workers() if config.num_workers is None else config.num_workers
    embedded, failed, seen = 0, [], 0
    rate = Rate("img")
    with make_progress() as progress, torch.inference_mode():
        label = "embedding" + (f" [{proc.rank}/{proc.world}]" if proc.world > 1 else "")
        task = progress.add_task(label, total=len(todo) if total is not None else None, rate="")
        for ids, batch in decoded_batches(backbone, todo, config.batch_size, workers, config.strict, failed,
                                          progress, task, rate, gpu_decode=config.gpu_decode):
            vecs = backbone.embed_images(batch).float().cpu().numpy()
            embedded += writer.append(ids, [name(k) for k in ids], vecs)
            seen += len(ids)
    if fragments:
        writer.close()
        proc.wait()  # every fragment is journaled before the journals are read
        _commit_journals(store, proc)
    if proc.world == 1 and not isinstance(source, DatasetOptions):
        store.record_signatures(source)  # rows of an older store: their files as they are now
    counts = {"images": total if total is not None else seen + len(failed), "embedded": embedded,
              "already_stored": stored, "failed": len(failed)}
    result.counts = _summed(counts, proc)
    result.counts.update({k: v for k, v in (("changed", changed), ("removed", removed)) if v})  # when there are any
    for share in proc.gather([(name(key), reason) for key, reason in failed]):
        for item, reason in share:  # every process's, so the main summary lists them all
            result.skip(item, reason)
    result.outputs = {"embeddings": str(config.output)}
    result.details = {"manifest": store.manifest.to_dict(), "batch_size": config.batch_size, "num_workers": workers,
                      "processes": proc.world}


def _summed(counts: dict[str, int], proc: Any) -> dict[str, int]:
    """The counts of every process added up (each process counted its own share)."""
    if proc.world <= 1:
        return counts
    every = proc.gather(counts)
    return {k: sum(c[k] for c in every) for k in counts}
