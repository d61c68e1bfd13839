"""``cirkit caption``: describe every image of a folder (or gallery JSONL) with a captioning model.

Stage 1 of the paper's data pipeline (section II-A): an MLLM captions unannotated images.

* Models: any transformers image-text-to-text model by hub id or folder. A processor with
  a chat template (LLaVA-1.5 as in the paper, LLaVA-NeXT, Qwen2-VL, ...) is an instruction
  model and gets ``prompt`` inside that template; one without (BLIP, GIT,
  vision-encoder-decoder) is a plain captioner and ``prompt``, if given, is a text prefix.
* Prompt: ``--prompt`` is a preset name from :data:`PROMPT_PRESETS` or the instruction text.
  ``cirkit`` (the default, :data:`DEFAULT_PROMPT`) is our own wording asking for the
  attributes that composed retrieval edits (objects, colours, shapes, sizes, materials,
  positions, background) in one short sentence. ``paper`` asks for the detailed description
  of section II-A (LLaVA-1.5-13B; Fig. 3's captions run 40-80 words). The paper prints its
  captioning prompt in the top part of Table I, which is an image in every copy we could
  read, so :data:`PAPER_PROMPT` is a reconstruction, not the paper's text; the paper's
  *reformulation* prompt is text and is copied verbatim (:mod:`cirkit.reformulate`).
* Batched, left-padded generation under ``torch.inference_mode``; images are decoded in
  DataLoader workers with :func:`cirkit.io.open_image`; unreadable images are skipped and
  listed (``strict`` makes the first one fatal).
* One writer per output: the run holds :func:`~cirkit.io.lock.output_lock` on the output (and
  each process on its part file), so a second run on the same output fails at once naming
  the first (``wait``: queue behind it).
* Nothing heavy before it is needed: which images are already captioned is read first, and
  the model is loaded on the first batch with an image to caption, so a re-run with nothing
  left to do reports that without loading a model.
* Exactly-once and resumable: each caption is appended (one full line + flush) through
  :class:`~cirkit.io.JsonlAppender` as soon as its batch finishes; a re-run skips the ids
  already written, and a torn last line left by ``kill -9`` is cut off.
* Sharding under ``accelerate launch``: every image id belongs to one process by a stable
  hash (:func:`cirkit.device.shard_of`). Process ``r`` appends to its own
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
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirkit.config import (
    UsageError,
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
    wait_setting,
)
from cirkit.errors import CirkitError, ImageError, RecordError
from cirkit.io.atomic import check_file_output, is_stdio
from cirkit.io.datasets import (
    DatasetOptions,
    dataset_split_setting,
    id_column_setting,
    image_column_setting,
    input_format_setting,
    is_dataset,
    text_column_setting,
)
from cirkit.io.images import IMAGE_EXTENSIONS, NOT_UTF8_NAME, display_path, list_images
from cirkit.io.jsonl import (
    JsonlAppender,
    check_not_input,
    check_output_kind,
    check_text,
    iter_complete,
    read_json,
    read_jsonl,
)
from cirkit.io.lock import output_lock
from cirkit.io.shards import ids_in, jsonl_shard, merge_parts, part_path, parts
from cirkit.records import Caption, is_url, output_dir, relative_path, resolve_path
from cirkit.summary import Rate, StageResult, make_progress, timed

log = logging.getLogger("cirkit")

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
# Our own wording (the paper's prompt text was not retrievable): see the module docstring.
DEFAULT_PROMPT = (
    "Describe this image in one sentence of at most 25 words. Name the main objects and their "
    "colour, shape, size, material and position, and the background."
)
# Section II-A: "a sufficiently detailed text description" from LLaVA-1.5. Table I's caption
# prompt is an image in our copy of the paper, so this wording is ours, NOT verbatim (see above).
PAPER_PROMPT = "Describe the image in detail."
# ``--prompt NAME``: the one place caption prompts are named (recipes say ``prompt: paper``).
PROMPT_PRESETS: dict[str, str] = {"cirkit": DEFAULT_PROMPT, "paper": PAPER_PROMPT}


def resolve_prompt(prompt: str | None) -> str | None:
    """The instruction ``--prompt`` names: a preset's text, or the text given (None: the model's default)."""
    return PROMPT_PRESETS.get(prompt, prompt) if prompt is not None else None


@dataclass
class CaptionConfig:
    """Settings of ``cirkit caption`` (CLI flags, recipe keys and Python arguments alike)."""

    images: Path | None = setting(
        None, positional=True, metavar="IMAGES", stdio="in",
        help="A folder of images (recursive) or a gallery/captions JSONL with id and image.")
    output: Path = setting(Path("captions.jsonl"), short="-o", stdio="out", help="Captions JSONL to write or resume.")
    from_file: Path | None = setting(
        None, flag="--from",
        help="Import existing captions (JSONL with id/image/caption, CSV, or JSON) instead of running a model.")
    model: str = setting(DEFAULT_MODEL, short="-m", help="Hub id or folder of a captioning model.")
    prompt: str | None = setting(
        None, show_default="cirkit for chat models",
        help="Instruction for chat models: a preset (cirkit: one short sentence; paper: a detailed description, "
             "section II-A) or the text itself. For plain captioners like BLIP, a text prefix.")
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
    wait: bool = wait_setting()
    image_column: str | None = image_column_setting()
    id_column: str | None = id_column_setting()
    text_column: str | None = text_column_setting("captions to import (--from)", "caption, text or txt")
    dataset_split: str | None = dataset_split_setting()
    input_format: str = input_format_setting()

    def __post_init__(self) -> None:
        check_settings(self)


# The part-file protocol lives in cirkit.io.shards (shared with reformulate); the names stay importable here.
__all__ = ["CaptionConfig", "import_captions", "merge_parts", "part_path", "run"]
_parts = parts
_ids_in = ids_in


def _inputs(images: Path, result: StageResult, options: DatasetOptions, proc: Any,
            limit: int | None = None) -> tuple[list[tuple[str, Any, str | None]], bool]:
    """``(id, image, group)`` from a folder of images, a gallery/captions JSONL or a dataset, and
    whether the list is already this process's share (a dataset is split by ``datasets`` itself).

    Files whose names cannot be written as UTF-8 text are counted as skipped, named.
    """
    if is_dataset(images, options):
        from cirkit.io.datasets import image_items

        if options.streaming:
            raise CirkitError(f"{images}: caption reads a dataset by row; leave out --streaming")
        return [(k, ref, None) for k, ref in image_items(images, options, proc.rank, proc.world, limit)], True
    if images.is_dir():
        out, unnamed = [], []
        for key, path in list_images(images, skipped=unnamed):
            parent = Path(key).parent.as_posix()
            out.append((key, path, None if parent == "." else parent))
        for item, reason in unnamed:
            result.skip(item, reason)
        return out, False
    if not images.exists() and not is_stdio(images):
        raise CirkitError(f"{display_path(images)}: no such folder or file (give a folder of images, a gallery JSONL "
                          f"or a dataset)")
    if images.suffix.lower() in IMAGE_EXTENSIONS:
        raise CirkitError(f"{images}: is an image; give the folder that holds it (or a gallery JSONL listing it)")
    out, seen = [], set()
    for lineno, obj in read_jsonl(images):
        image = obj.get("image")
        if image is None:
            raise RecordError(images, lineno, "missing (each line needs id and image)", "image")
        if not isinstance(image, str) or not image.strip():
            raise RecordError(images, lineno, f"expected a non-empty string (an image path), got {image!r:.60}", "image")
        if is_url(image):
            raise RecordError(images, lineno, f"{image[:80]!r} is a URL; cirkit reads images from local files, so "
                                              "download them and list their paths", "image")
        if isinstance(obj.get("id"), (bool, float, list, dict)):
            raise RecordError(images, lineno, f"expected a string, got {obj['id']!r:.60}", "id")
        key = str(obj.get("id") or Path(image).stem)
        if key in seen:
            raise RecordError(images, lineno, f"duplicate id {key!r}", "id")
        seen.add(key)
        group = obj.get("group")
        out.append((key, resolve_path(image, images.parent), None if group is None else str(group)))
    if not out:
        raise CirkitError(f"{images}: no images listed")
    return out, False


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


class _Captioner:
    """The captioning model, loaded on first use: a run with nothing left to caption loads none."""

    def __init__(self, config: CaptionConfig, device: str | None, out: Path):
        self.config, self.device, self.out = config, device, out
        self.cap: Any = None
        self.prompt = resolve_prompt(config.prompt)

    def get(self) -> Any:
        if self.cap is None:
            from cirkit.generation import load_captioner

            c = self.config
            self.cap = load_captioner(c.model, c.device or self.device, c.precision, c.trust_remote_code)
            if not self.cap.chat and c.prompt in PROMPT_PRESETS:
                raise CirkitError(f"--prompt {c.prompt}: a preset instruction for chat models, but {c.model} is a "
                                  "plain captioner (its prompt is a text prefix); leave --prompt out or give the prefix")
            self.prompt = (resolve_prompt(c.prompt) or DEFAULT_PROMPT) if self.cap.chat else c.prompt
            if not is_stdio(self.out):
                _check_same_model(self.out, self.cap.model_id, self.prompt)  # now with the default prompt too
        return self.cap


def images_folder(output: Path) -> Path:
    """Where dataset images with no file of their own are written, so captions name files (train reads them)."""
    return output.with_name(f"{output.name}.images")


def _text_path(path: Any, out_dir: Path, output: Path | None = None) -> str | None:
    """``path`` as written in the output (relative to it), or None if it is not UTF-8 text.

    A dataset row's image (bytes, no file) is first written into :func:`images_folder`.
    """
    if not isinstance(path, (str, Path)):
        from cirkit.io.datasets import export_image

        path = export_image(path, images_folder(output if output is not None else out_dir / "captions.jsonl"))
    rel = relative_path(path, out_dir)
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return rel


def run(config: CaptionConfig) -> StageResult:
    """Caption images (or import captions with ``from_file``), appending records as they finish."""
    wait = bool(config.wait)
    if config.from_file is not None:
        return import_captions(config.from_file, config.output, strict=config.strict, wait=wait,
                               options=DatasetOptions.of(config))
    if config.images is None:
        raise UsageError("give a folder of images (or a gallery JSONL) to caption, or --from FILE to import captions")
    from cirkit.device import process_info
    from cirkit.generation import GenerationSettings

    settings = GenerationSettings.from_config(config)
    settings.validate()
    if config.batch_size < 1:
        raise CirkitError(f"--batch-size must be at least 1, got {config.batch_size}")
    result = StageResult("caption")
    out, images = Path(config.output), Path(config.images)
    check_file_output(out)  # before its lock file is made beside it
    check_not_input(out, images)
    check_output_kind(out, Caption)  # before its ids count as done
    proc = process_info()
    if is_stdio(out) and proc.world > 1:
        raise CirkitError("-o - streams captions from one process; under accelerate launch write them to a file")
    with timed(result):
        items, shared = _inputs(images, result, DatasetOptions.of(config), proc, config.limit)
        if config.limit is not None:
            items = items[: config.limit]
        with jsonl_shard(out, proc, wait, "captions file") as shard:
            _caption(config, settings, items, shared, out, shard, proc, result)
            result.outputs = {"captions": str(out)}
        if shard.merged:
            result.counts["merged_from_parts"] = shard.merged
        _sum_processes(result, proc)
    return result


def _sum_processes(result: StageResult, proc: Any) -> None:
    """On the main process, the counts of every process (each reported its own share)."""
    if proc.world <= 1:
        return
    mine = {k: result.counts.get(k, 0) for k in ("captioned", "empty")}
    every = proc.gather(mine)
    for k in ("captioned", "empty"):
        result.counts[k] = sum(c[k] for c in every)
    result.details["per_process"] = [c["captioned"] for c in every]


def _caption(config: CaptionConfig, settings: Any, items: list[tuple[str, Any, str | None]], shared: bool,
             out: Path, shard: Any, proc: Any, result: StageResult) -> None:
    from cirkit.device import my_share
    from cirkit.encode import default_workers, iter_image_batches
    from cirkit.generation import caption_images

    if not is_stdio(out):  # standard output has nothing to resume
        _check_same_model(out, config.model, resolve_prompt(config.prompt))  # before any model is loaded
    done = shard.done
    out_dir = output_dir(out)
    mine, shown, group_of = [], {}, {k: g for k, _, g in items}
    for k, p, _ in items if shared else my_share(items, proc):
        if k in done:
            continue
        if isinstance(p, Path) and _text_path(p, out_dir) is None:
            result.skip(display_path(p), NOT_UTF8_NAME)
            continue
        mine.append((k, p))
        shown[k] = p
    result.counts["images"] = len(items) if not shared else sum(proc.gather(len(items)))
    result.counts["already_done"] = len(done & set(group_of)) if not shared else sum(
        proc.gather(sum(1 for k in group_of if k in done)))
    workers = default_workers() if config.num_workers is None else config.num_workers
    model = _Captioner(config, proc.device, out)
    captioned = empty = 0
    rate = Rate("img")
    with JsonlAppender(shard.target) as writer, make_progress() as progress:
        task = progress.add_task("captioning" + (f" [{proc.rank}/{proc.world}]" if proc.world > 1 else ""),
                                 total=len(mine), rate="")
        for ids, images, bad in iter_image_batches(mine, _identity, _as_list, config.batch_size, workers) if mine else ():
            for key, reason in bad:
                if config.strict:
                    raise ImageError(display_path(str(shown[key])), reason)
                result.skip(key, reason)
            if ids:
                texts = caption_images(model.get(), images, model.prompt, settings)
                for key, text in zip(ids, texts, strict=True):
                    empty += not text.strip()
                    captioned += writer.write(Caption(
                        id=key, image=_text_path(shown[key], out_dir, out), caption=text, model=model.cap.model_id,
                        prompt=model.prompt, settings=settings.to_dict(), group=group_of.get(key)))
            progress.update(task, advance=len(ids) + len(bad), rate=rate.add(len(ids) + len(bad)))
    result.counts["captioned"] = captioned
    result.counts["empty"] = empty
    if writer.duplicates:
        result.counts["duplicate_ids_in_output"] = len(writer.duplicates)
    if model.cap is None:
        result.details["nothing_to_do"] = True
        log.info("%s: nothing to do: %d of %d images already captioned%s", out, result.counts["already_done"],
                 result.counts["images"], f", {len(result.skipped)} skipped" if result.skipped else "")
    result.details.update(model=config.model, prompt=model.prompt, settings=settings.to_dict(),
                          process=f"{proc.rank}/{proc.world}")


# --------------------------------------------------------------------------- import


def _read_any(path: Path, options: DatasetOptions | None = None) -> list[tuple[str, int | None, Any]]:
    """``(where, line, row)`` for each row of a captions file (JSONL, CSV or JSON) or dataset to import."""
    if is_dataset(path, options):
        return _read_dataset(path, options or DatasetOptions())
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [(str(path), n, row) for n, row in read_jsonl(path)]
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict):  # {image path or id: caption}
            return [(f"{path} key {k!r:.60}", None, {"image": k, "caption": v}) for k, v in data.items()]
        if isinstance(data, list):
            return [(f"{path} item {n}", None, x) for n, x in enumerate(data)]
        raise CirkitError(f"{path}: expected a JSON list of objects or a mapping image -> caption")
    raise CirkitError(f"{path}: cannot import {suffix or 'this file'}; use .jsonl, .csv or .json")


def _read_dataset(path: Path, options: DatasetOptions) -> list[tuple[str, int | None, Any]]:
    """Rows of a captions dataset: id, image (a file path, or the row's image bytes), caption text."""
    from cirkit.io.datasets import image_cell, open_rows, raw_rows

    rows = open_rows(path, options, text_names=("caption", "text", "txt"), text_what="captions", text_required=True)
    out: list[tuple[str, int | None, Any]] = []
    cells: dict[str, Any] = {}
    for n, row in enumerate(raw_rows(rows)):
        key = str(row[rows.id]) if rows.id else str(n)
        extra = {k: v for k, v in row.items() if k not in (rows.id, rows.image, rows.text) and not k.startswith("__")
                 and isinstance(v, (str, int, float, bool))}
        out.append((rows.label(key), None, {**extra, "id": key, "caption": row.get(rows.text),
                                            "image": image_cell(row, rows.image, rows, key, cells, n)}))
    return out


def _read_csv(path: Path) -> list[tuple[str, int | None, Any]]:
    rows: list[tuple[str, int | None, Any]] = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        try:
            if not reader.fieldnames or "caption" not in reader.fieldnames:
                raise CirkitError(f"{path}: a CSV to import needs a header with 'caption' and 'image' (or 'id') columns")
            for row in reader:
                row = {k: v for k, v in row.items() if k is not None}  # cells beyond the header are ignored
                check_text(row, path, reader.line_num)
                rows.append((str(path), reader.line_num, row))
        except UnicodeDecodeError as e:
            raise RecordError(path, reader.line_num + 1, f"not valid UTF-8 (byte {e.start}): save the file as UTF-8") from None
        except csv.Error as e:
            raise RecordError(path, reader.line_num, f"malformed CSV ({e})") from None
    return rows


def _import_record(where: str, line: int | None, row: Any, source: Path) -> tuple[str, str, dict[str, Any]]:
    """``(id, image as given, the Caption fields)`` of one imported row, checked like a record."""
    if not isinstance(row, dict):
        raise RecordError(where, line, "expected an object with image and caption")
    image, text = row.get("image"), row.get("caption")
    for name, value in (("image", image), ("caption", text)):
        if value is None or (name == "image" and value == ""):
            raise RecordError(where, line, "missing", name)
        if not isinstance(value, str) and not (name == "image" and hasattr(value, "image_source")):
            raise RecordError(where, line, f"expected a string, got {value!r:.60}", name)
    if row.get("id") not in (None, "") and (not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool)):
        raise RecordError(where, line, f"expected a string, got {row['id']!r:.60}", "id")
    key = str(row.get("id") or Path(str(image)).with_suffix("").as_posix())
    extra = {k: v for k, v in row.items() if k not in ("id", "image", "caption", "model", "prompt",
                                                       "settings", "group") and v not in (None, "")}
    fields = {"id": key, "caption": text, "model": str(row.get("model") or "imported"),
              "prompt": row.get("prompt") or None, "settings": row.get("settings") or None,
              "group": None if row.get("group") in (None, "") else str(row["group"]),
              **extra, "imported_from": str(source)}
    return key, image, fields


def _exported(image: Any, out_dir: Path, output: Path, key: str, strict: bool, result: StageResult) -> str | None:
    """The output-relative path of a dataset image written into :func:`images_folder` (None: skipped)."""
    try:
        return _text_path(image, out_dir, output)
    except ImageError as e:
        if strict:
            raise
        result.skip(key, e.reason)
        return None


def import_captions(source: Path, output: Path, strict: bool = False, wait: bool = False,
                    options: DatasetOptions | None = None) -> StageResult:
    """Copy captions from ``source`` into ``output``'s format, image paths made relative to ``output``.

    ``source`` may be a dataset (id, image, caption columns): images with no file of their own are
    written once into :func:`images_folder`, so the captions name files like any others.
    """
    result = StageResult("caption")
    source, output = Path(source), Path(output)
    dataset = is_dataset(source, options)
    if not source.exists() and not dataset:
        raise CirkitError(f"{source}: no such file to import")
    if source.is_dir() and not dataset:
        raise CirkitError(f"{source}: is a folder; --from takes a captions file (.jsonl, .csv or .json) or a dataset")
    check_file_output(output)
    check_not_input(output, source)
    check_output_kind(output, Caption)
    with timed(result), output_lock(output, wait=wait, what="captions file"):
        rows = _read_any(source, options)
        out_dir = output_dir(output)
        seen: dict[str, str] = {}
        records: list[tuple[str, str, int | None, Path, dict[str, Any]]] = []
        for where, line, row in rows:  # every row is checked before anything is written
            key, image, fields = _import_record(where, line, row, source)
            at = f"{where}:{line}" if line else where
            if key in seen:
                raise RecordError(where, line, f"duplicate id {key!r} (first at {seen[key]})", "id")
            seen[key] = at
            Caption.from_dict({**fields, "image": str(image)}, where, line)
            records.append((at, where, line, image if not isinstance(image, str) else resolve_path(image, source.parent),
                            fields))
        imported = 0
        with JsonlAppender(output) as writer:
            for at, where, line, path, fields in records:
                if not isinstance(path, Path):  # a dataset row's image: written beside the output, once
                    writer_rel = _exported(path, out_dir, output, fields["id"], strict, result)
                    if writer_rel is not None:
                        imported += writer.write(Caption.from_dict({**fields, "image": writer_rel}, where, line))
                    continue
                rel = _text_path(path, out_dir) if path.exists() else None
                if rel is None:
                    reason = "no such file" if not path.exists() else NOT_UTF8_NAME
                    if strict:
                        raise ImageError(display_path(path), f"{reason} (listed in {at})")
                    result.skip(fields["id"], f"image not found: {display_path(path)}" if not path.exists() else reason)
                    continue
                imported += writer.write(Caption.from_dict({**fields, "image": rel}, where, line))
        result.counts["rows"] = len(rows)
        result.counts["imported"] = imported
        result.counts["already_done"] = len(rows) - imported - len(result.skipped)
        if writer.duplicates:
            result.counts["duplicate_ids_in_output"] = len(writer.duplicates)
        result.outputs = {"captions": str(output)}
    return result
