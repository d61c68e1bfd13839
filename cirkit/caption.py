"""``cirkit caption``: describe every image of a folder (or gallery JSONL) with a captioning model.

Stage 1 of the paper's data pipeline (section II-A): an MLLM captions unannotated images.

* Models: any transformers image-text-to-text model by hub id or folder. A processor with
  a chat template (LLaVA-1.5 as in the paper, LLaVA-NeXT, Qwen2-VL, ...) is an instruction
  model and gets ``prompt`` inside that template; one without (BLIP, GIT,
  vision-encoder-decoder) is a plain captioner and ``prompt``, if given, is a text prefix.
* Prompt: the paper's exact captioning prompt could not be retrieved here, so
  :data:`DEFAULT_PROMPT` is our own wording asking for the attributes that composed
  retrieval edits (objects, colours, shapes, sizes, materials, positions, background).
* Batched, left-padded generation under ``torch.inference_mode``; images are decoded in
  DataLoader workers with :func:`cirkit.io.open_image`; unreadable images are skipped and
  listed (``strict`` makes the first one fatal).
* Exactly-once and resumable: each caption is appended (one full line + flush) through
  :class:`~cirkit.io.JsonlAppender` as soon as its batch finishes; a re-run skips the ids
  already written, and a torn last line left by ``kill -9`` is cut off.
* Sharding under ``accelerate launch``: every image id belongs to one process by a stable
  hash (:func:`cirkit.generation.shard_of`). Process ``r`` appends to its own
  ``<output>.part-<r>``; at the end the main process appends every part's records to the
  output through the same appender (which drops ids already there) and only then deletes
  the parts. Any interruption leaves the parts, and the next run (any number of processes)
  counts ids in the output *and* all parts as done and merges leftovers, so each id ends up
  in the output exactly once.

``import_captions`` (``--from FILE``) converts existing captions (JSONL with id/image/caption,
a CSV with those columns, or a JSON list/mapping) into the same format.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirkit.config import (
    batch_size_setting,
    check_settings,
    device_setting,
    num_beams_setting,
    num_workers_setting,
    precision_setting,
    sampling_temperature_setting,
    setting,
    strict_setting,
    top_p_setting,
    trust_remote_code_setting,
)
from cirkit.errors import CirkitError, ImageError, RecordError
from cirkit.io.images import list_images
from cirkit.io.jsonl import JsonlAppender, iter_complete, read_jsonl
from cirkit.records import Caption, relative_path, resolve_path
from cirkit.summary import Rate, StageResult, make_progress, timed

log = logging.getLogger("cirkit")

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
# Our own wording (the paper's prompt text was not retrievable): see the module docstring.
DEFAULT_PROMPT = (
    "Describe this image in one sentence of at most 25 words. Name the main objects and their "
    "colour, shape, size, material and position, and the background."
)


@dataclass
class CaptionConfig:
    """Settings of ``cirkit caption`` (CLI flags, recipe keys and Python arguments alike)."""

    images: Path | None = setting(
        None, positional=True, metavar="IMAGES",
        help="A folder of images (recursive) or a gallery/captions JSONL with id and image.")
    output: Path = setting(Path("captions.jsonl"), short="-o", help="Captions JSONL to write or resume.")
    from_file: Path | None = setting(
        None, flag="--from",
        help="Import existing captions (JSONL with id/image/caption, CSV, or JSON) instead of running a model.")
    model: str = setting(DEFAULT_MODEL, short="-m", help="Hub id or folder of a captioning model.")
    prompt: str | None = setting(
        None, help="Instruction for chat models (a text prefix for plain captioners like BLIP).")
    max_new_tokens: int = setting(60, ge=1, help="Longest caption in tokens.")
    temperature: float = sampling_temperature_setting()
    top_p: float = top_p_setting()
    num_beams: int = num_beams_setting()
    seed: int = setting(0, ge=0, help="Sampling seed.")
    batch_size: int = batch_size_setting(8, "Images", aliases=("-b",))
    num_workers: int | None = num_workers_setting(show_default="up to 4")
    limit: int | None = setting(None, ge=1, help="Caption only the first N images.")
    strict: bool = strict_setting()
    device: str | None = device_setting()
    precision: str | None = precision_setting(aliases=("--dtype",))
    trust_remote_code: bool = trust_remote_code_setting()

    def __post_init__(self) -> None:
        check_settings(self)


def part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.part-{rank}")


def _parts(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f"{output.name}.part-*")) if output.parent.exists() else []


def _ids_in(path: Path) -> set[str]:
    """Ids of complete lines (a torn last line, still being written or left by a crash, is ignored)."""
    return {str(obj["id"]) for _, obj in iter_complete(path, skip_malformed=True)
            if isinstance(obj, dict) and "id" in obj}


def merge_parts(output: Path) -> int:
    """Append the records of every ``output.part-*`` to ``output`` (once per id), then delete the parts."""
    parts = _parts(output)
    if not parts:
        return 0
    moved = 0
    with JsonlAppender(output) as writer:
        for part in parts:
            for _, obj in iter_complete(part, skip_malformed=True):
                if isinstance(obj, dict) and "id" in obj:
                    moved += writer.write(obj)
    for part in parts:  # only after everything is safely in the output
        part.unlink(missing_ok=True)
    return moved


def _inputs(images: Path) -> list[tuple[str, Path, str | None]]:
    """``(id, image path, group)`` from a folder of images or a gallery/captions JSONL."""
    if images.is_dir():
        out = []
        for key, path in list_images(images):
            parent = Path(key).parent.as_posix()
            out.append((key, path, None if parent == "." else parent))
        return out
    if not images.exists():
        raise CirkitError(f"{images}: no such folder or file (give a folder of images or a gallery JSONL)")
    out, seen = [], set()
    for lineno, obj in read_jsonl(images):
        if not isinstance(obj, dict) or "image" not in obj:
            raise CirkitError(f"{images}:{lineno}: field 'image' missing (each line needs id and image)")
        key = str(obj.get("id") or Path(str(obj["image"])).stem)
        if key in seen:
            raise CirkitError(f"{images}:{lineno}: field 'id': duplicate id {key!r}")
        seen.add(key)
        group = obj.get("group")
        out.append((key, resolve_path(str(obj["image"]), images.parent), None if group is None else str(group)))
    if not out:
        raise CirkitError(f"{images}: no images listed")
    return out


def _identity(image: Any) -> Any:  # picklable "transform" for DataLoader workers
    return image


def _as_list(items: list[Any]) -> list[Any]:
    return items


def _check_same_model(output: Path, model: str, prompt: str | None) -> None:
    for path in [output, *_parts(output)]:
        # complete lines only: a torn first line (a crash during the first write) is cut on resume
        for lineno, obj in iter_complete(path):
            if not isinstance(obj, dict):
                raise RecordError(path, lineno, "expected a JSON object")
            if obj.get("model") not in (None, model) or (prompt is not None and obj.get("prompt") not in (None, prompt)):
                raise CirkitError(
                    f"{path}:{lineno}: captions made with model {obj.get('model')!r} / another prompt; write to a "
                    f"new -o file (or delete this one) instead of resuming it with {model!r}"
                )
            break


def run(config: CaptionConfig) -> StageResult:
    """Caption images (or import captions with ``from_file``), appending records as they finish."""
    if config.from_file is not None:
        return import_captions(config.from_file, config.output, strict=config.strict)
    if config.images is None:
        raise CirkitError("give a folder of images (or a gallery JSONL) to caption, or --from FILE to import captions")
    from cirkit.encode import default_workers, iter_image_batches
    from cirkit.generation import GenerationSettings, caption_images, load_captioner, process_info, shard_of

    settings = GenerationSettings.from_config(config)
    settings.validate()
    if config.batch_size < 1:
        raise CirkitError(f"--batch-size must be at least 1, got {config.batch_size}")
    result = StageResult("caption")
    out = Path(config.output)
    proc = process_info()
    with timed(result):
        items = _inputs(Path(config.images))
        if config.limit is not None:
            items = items[: config.limit]
        group_of = {k: g for k, _, g in items}
        cap = load_captioner(config.model, config.device or proc.device, config.precision, config.trust_remote_code)
        prompt = (config.prompt or DEFAULT_PROMPT) if cap.chat else config.prompt
        _check_same_model(out, cap.model_id, prompt)

        done = _ids_in(out)
        for part in _parts(out):
            done |= _ids_in(part)
        proc.wait()  # everyone has read the done set before anyone appends
        mine = [(k, p) for k, p, _ in items if k not in done and shard_of(k, proc.world) == proc.rank]
        result.counts["images"] = len(items)
        result.counts["already_done"] = sum(1 for k, _, _ in items if k in done)
        target = out if proc.world == 1 else part_path(out, proc.rank)
        out_dir = out.parent.resolve()
        workers = default_workers() if config.num_workers is None else config.num_workers
        captioned = empty = 0
        rate = Rate("img")
        with JsonlAppender(target) as writer, make_progress() as progress:
            task = progress.add_task("captioning" + (f" [{proc.rank}/{proc.world}]" if proc.world > 1 else ""),
                                     total=len(mine), rate="")
            paths = dict(mine)
            for ids, images, bad in iter_image_batches(mine, _identity, _as_list, config.batch_size, workers):
                for key, reason in bad:
                    if config.strict:
                        raise ImageError(paths[key], reason)
                    result.skip(key, reason)
                if ids:
                    texts = caption_images(cap, images, prompt, settings)
                    for key, text in zip(ids, texts, strict=True):
                        empty += not text.strip()
                        writer.write(Caption(id=key, image=relative_path(paths[key], out_dir), caption=text,
                                             model=cap.model_id, prompt=prompt, settings=settings.to_dict(),
                                             group=group_of.get(key)))
                        captioned += 1
                progress.update(task, advance=len(ids) + len(bad), rate=rate.add(len(ids) + len(bad)))
        proc.wait()
        if proc.is_main:
            merged = merge_parts(out)
            if merged:
                result.counts["merged_from_parts"] = merged
        result.counts["captioned"] = captioned
        result.counts["empty"] = empty
        result.details.update(model=cap.model_id, prompt=prompt, settings=settings.to_dict(),
                              process=f"{proc.rank}/{proc.world}")
        result.outputs = {"captions": str(out)}
    return result


# --------------------------------------------------------------------------- import


def _read_any(path: Path) -> list[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(read_jsonl(path))
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "caption" not in reader.fieldnames:
                raise CirkitError(f"{path}: a CSV to import needs a header with 'caption' and 'image' (or 'id') columns")
            return [(n, dict(row)) for n, row in enumerate(reader, start=2)]
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CirkitError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):  # {image path or id: caption}
            return [(None, {"image": k, "caption": v}) for k, v in data.items()]  # type: ignore[misc]
        if isinstance(data, list):
            return [(None, x) for x in data]  # type: ignore[misc]
        raise CirkitError(f"{path}: expected a JSON list of objects or a mapping image -> caption")
    raise CirkitError(f"{path}: cannot import {suffix or 'this file'}; use .jsonl, .csv or .json")


def import_captions(source: Path, output: Path, strict: bool = False) -> StageResult:
    """Copy captions from ``source`` into ``output``'s format, image paths made relative to ``output``."""
    result = StageResult("caption")
    source, output = Path(source), Path(output)
    if not source.exists():
        raise CirkitError(f"{source}: no such file to import")
    with timed(result):
        rows = _read_any(source)
        out_dir = output.parent.resolve()
        seen: dict[str, Any] = {}
        imported = 0
        with JsonlAppender(output) as writer:
            for lineno, row in rows:
                where = f"{source}:{lineno}" if lineno else f"{source}"
                if not isinstance(row, dict):
                    raise CirkitError(f"{where}: expected an object with image and caption")
                image, text = row.get("image"), row.get("caption")
                if image in (None, "") or text is None:
                    raise CirkitError(f"{where}: field '{'image' if image in (None, '') else 'caption'}' missing")
                key = str(row.get("id") or Path(str(image)).with_suffix("").as_posix())
                if key in seen:
                    raise CirkitError(f"{where}: field 'id': duplicate id {key!r} (first at {seen[key]})")
                seen[key] = where
                path = resolve_path(str(image), source.parent)
                if not path.exists():
                    if strict:
                        raise ImageError(path, "no such file (listed in " + where + ")")
                    result.skip(key, f"image not found: {path}")
                    continue
                extra = {k: v for k, v in row.items() if k not in ("id", "image", "caption", "model", "prompt",
                                                                   "settings", "group") and v not in (None, "")}
                imported += writer.write(Caption(
                    id=key, image=relative_path(path, out_dir), caption=str(text),
                    model=str(row.get("model") or "imported"), prompt=row.get("prompt") or None,
                    settings=row.get("settings") or None,
                    group=None if row.get("group") in (None, "") else str(row["group"]),
                    extra={**extra, "imported_from": str(source)},
                ))
        result.counts["rows"] = len(rows)
        result.counts["imported"] = imported
        result.counts["already_done"] = len(rows) - imported - len(result.skipped)
        result.outputs = {"captions": str(output)}
    return result
