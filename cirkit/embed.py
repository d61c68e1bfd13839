"""``embed``: gallery images -> a resumable Lance embeddings store, through any backbone.

Images are decoded and transformed in DataLoader workers (:func:`cirkit.encode.iter_image_batches`),
embedded under ``torch.inference_mode`` and appended batch by batch to
:class:`cirkit.io.embeddings.EmbeddingStore`, so a killed run keeps every finished batch
and a re-run embeds only the ids not stored yet. Unreadable images are skipped and
counted (``strict`` makes the first one fatal).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cirkit.config import (
    allow_pickle_setting,
    batch_size_setting,
    check_settings,
    device_setting,
    num_workers_setting,
    precision_setting,
    setting,
    strict_setting,
    trust_remote_code_setting,
    wait_setting,
)
from cirkit.errors import CirkitError
from cirkit.summary import StageResult, timed


@dataclass
class EmbedConfig:
    """Settings of ``cirkit embed`` (recipe section ``embed``)."""

    input: Path | None = setting(None, positional=True, metavar="IMAGES",
                                 help="A folder of images or a gallery.jsonl.")
    output: Path | None = setting(None, short="-o", help="Embeddings store to write or extend (NAME.lance).")
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
    wait: bool = wait_setting()

    def __post_init__(self) -> None:
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
    raise CirkitError(f"{source}: expected a folder of images or a gallery.jsonl")


def run(config: EmbedConfig, backbone=None) -> StageResult:
    """Embed the gallery into ``config.output``; ``backbone`` overrides loading one from the config.

    The store is written under its single-writer lock for the whole run: a second ``embed``
    on the same store fails at once naming this one (or waits, with ``wait``).
    """
    from cirkit.io.atomic import check_utf8_path
    from cirkit.io.embeddings import store_location
    from cirkit.io.lock import output_lock

    if config.input is None:
        raise CirkitError("nothing to embed: pass IMAGES_DIR or gallery.jsonl")
    if config.output is None:
        raise CirkitError("no output: pass -o gallery.lance")
    if config.batch_size < 1:
        raise CirkitError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.num_workers is not None and config.num_workers < 0:
        raise CirkitError(f"--num-workers must be at least 0, got {config.num_workers}")
    store_location(config.output)
    if Path(config.input).resolve() == Path(config.output).resolve():
        raise CirkitError(f"{config.output}: is also the input; write the embeddings to another path (-o)")
    check_utf8_path(config.output, "embeddings store")
    result = StageResult("embed")
    with timed(result):
        unlisted: list[tuple[str, str]] = []
        items = gallery_items(config.input, None if config.strict else unlisted)
        if not items and unlisted:  # nothing at all to embed: say why, not an empty store
            raise CirkitError(f"{unlisted[0][0]}: {unlisted[0][1]}")
        with output_lock(config.output, wait=config.wait, what="embeddings store"):
            _embed(config, items, backbone, result)
        for item, reason in unlisted:
            result.skip(item, reason)
        result.counts["failed"] += len(unlisted)
        result.counts["images"] += len(unlisted)
    embedded = result.counts["embedded"]
    if embedded and result.seconds:
        result.metrics["images_per_s"] = round(embedded / result.seconds, 2)
    return result


def _embed(config: EmbedConfig, items: list[tuple[str, Path]], backbone, result: StageResult) -> None:
    """Append the embeddings of the items not stored yet (under the store's lock)."""
    import dataclasses

    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec
    from cirkit.io.embeddings import EmbeddingStore

    if backbone is None:
        backbone = load_backbone(BackboneSpec(
            backbone=config.backbone, model=config.model, pretrained=config.pretrained, mode="composed",
            device=config.device, precision=config.precision, trust_remote_code=config.trust_remote_code,
            allow_pickle=config.allow_pickle,
        ))
    # the gallery side of the model: image embeddings, whatever the query mode
    manifest = dataclasses.replace(backbone.manifest(), normalized=True, mode="image", count=None)
    created = not Path(config.output).exists()
    store = EmbeddingStore.open_for_append(config.output, manifest)
    try:
        _append(config, items, backbone, store, result)
    except BaseException:
        if created and not store.done:  # ours, and empty: a failed first run leaves no store behind
            import shutil

            shutil.rmtree(config.output, ignore_errors=True)
        raise


def _append(config: EmbedConfig, items: list[tuple[str, Path]], backbone, store, result: StageResult) -> None:
    """Embed the items ``store`` does not hold yet, batch by batch (each batch one commit)."""
    import torch

    from cirkit.encode import decoded_batches, default_workers
    from cirkit.summary import Rate, make_progress

    todo = [(k, p) for k, p in items if k not in store.done]
    result.counts = {"images": len(items), "embedded": 0, "already_stored": len(items) - len(todo), "failed": 0}
    path_of = dict(todo)
    workers = default_workers() if config.num_workers is None else config.num_workers
    rate = Rate("img")
    with make_progress() as progress, torch.inference_mode():
        task = progress.add_task("embedding", total=len(todo), rate="")
        failed: list[tuple[str, str]] = []
        for ids, batch in decoded_batches(backbone, todo, config.batch_size, workers, config.strict, failed,
                                          progress, task, rate):
            vecs = backbone.embed_images(batch).float().cpu().numpy()
            result.counts["embedded"] += store.append(ids, [str(path_of[k]) for k in ids], vecs)
    for key, reason in failed:
        result.skip(str(path_of[key]), reason)
    result.counts["failed"] = len(failed)
    result.outputs = {"embeddings": str(config.output)}
    result.details = {"manifest": store.manifest.to_dict(), "batch_size": config.batch_size, "num_workers": workers}
