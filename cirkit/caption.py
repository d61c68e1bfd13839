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

import contextlib
import csv
import logging
from collections.abc import Iterator
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
    wait_setting,
)
from cirkit.errors import CirkitError, ImageError, RecordError
from cirkit.io.atomic import check_file_output, glob_escape
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
    wait: bool = wait_setting()

    def __post_init__(self) -> None:
        check_settings(self)


def part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.part-{rank}")


def _parts(output: Path) -> list[Path]:
    """The part files ranks wrote: exactly ``<output>.part-<rank>`` (a user's other files are never merged)."""
    if not output.parent.is_dir():
        return []
    found = output.parent.glob(f"{glob_escape(output.name)}.part-*")
    return sorted(p for p in found if p.name[len(output.name) + len(".part-"):].isdigit())


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Complete records of an output or part (a torn last line, still being written or left by a
    crash, is passed over); a complete line that is not a record with an id is an error, never dropped."""
    for lineno, obj in iter_complete(path):
        if not isinstance(obj, dict) or "id" not in obj:
            raise RecordError(path, lineno, "expected a JSON object with an 'id'; fix or remove this line")
        yield lineno, obj


def _ids_in(path: Path) -> set[str]:
    return {str(obj["id"]) for _, obj in _records(path)}


def merge_parts(output: Path) -> int:
    """Append the records of every ``output.part-<rank>`` to ``output`` (once per id), then delete the parts."""
    parts = _parts(output)
    if not parts:
        return 0
    moved = 0
    with JsonlAppender(output) as writer:
        for part in parts:
            for _, obj in _records(part):
                moved += writer.write(obj)
    for part in parts:  # only after everything is safely in the output
        part.unlink(missing_ok=True)
    return moved


def _inputs(images: Path, result: StageResult) -> list[tuple[str, Path, str | None]]:
    """``(id, image path, group)`` from a folder of images or a gallery/captions JSONL.

    Files whose names cannot be written as UTF-8 text are counted as skipped, named.
    """
    if images.is_dir():
        out, unnamed = [], []
        for key, path in list_images(images, skipped=unnamed):
            parent = Path(key).parent.as_posix()
            out.append((key, path, None if parent == "." else parent))
        for item, reason in unnamed:
            result.skip(item, reason)
        return out
    if not images.exists():
        raise CirkitError(f"{display_path(images)}: no such folder or file (give a folder of images or a gallery JSONL)")
    if images.suffix.lower() in IMAGE_EXTENSIONS:
        raise CirkitError(f"{images}: is an image; give the folder that holds it (or a gallery JSONL listing it)")
    out, seen = [], set()
    for lineno, obj in read_jsonl(images):
        image = obj.get("image")
        if image is None:
            raise RecordError(images, lineno, "missing (each line needs id and image)", "image")
        if not isinstance(image, str) or not image.strip():
            raise RecordError(images, lineno, f"expected a non-empty string (an image path), got {image!r:.60}", "image")
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


@contextlib.contextmanager
def _locked(out: Path, rank: int, world: int, wait: bool) -> Iterator[None]:
    """The single-writer locks of this process: the output (main process) and its own part file."""
    with contextlib.ExitStack() as stack:
        if rank == 0:
            stack.enter_context(output_lock(out, wait=wait, what="captions file"))
        if world > 1:
            stack.enter_context(output_lock(part_path(out, rank), wait=wait, what="captions part file"))
        yield


class _Captioner:
    """The captioning model, loaded on first use: a run with nothing left to caption loads none."""

    def __init__(self, config: CaptionConfig, device: str | None, out: Path):
        self.config, self.device, self.out = config, device, out
        self.cap: Any = None
        self.prompt = config.prompt

    def get(self) -> Any:
        if self.cap is None:
            from cirkit.generation import load_captioner

            c = self.config
            self.cap = load_captioner(c.model, c.device or self.device, c.precision, c.trust_remote_code)
            self.prompt = (c.prompt or DEFAULT_PROMPT) if self.cap.chat else c.prompt
            _check_same_model(self.out, self.cap.model_id, self.prompt)  # now with the default prompt too
        return self.cap


def _text_path(path: Path, out_dir: Path) -> str | None:
    """``path`` as written in the output (relative to it), or None if it is not UTF-8 text."""
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
        return import_captions(config.from_file, config.output, strict=config.strict, wait=wait)
    if config.images is None:
        raise CirkitError("give a folder of images (or a gallery JSONL) to caption, or --from FILE to import captions")
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
    with timed(result):
        items = _inputs(images, result)
        if config.limit is not None:
            items = items[: config.limit]
        with _locked(out, proc.rank, proc.world, wait):
            _caption(config, settings, items, out, proc, result)
        result.outputs = {"captions": str(out)}
    return result


def _caption(config: CaptionConfig, settings: Any, items: list[tuple[str, Path, str | None]], out: Path,
             proc: Any, result: StageResult) -> None:
    from cirkit.device import shard_of
    from cirkit.encode import default_workers, iter_image_batches
    from cirkit.generation import caption_images

    _check_same_model(out, config.model, config.prompt)  # before any model is loaded
    done = _ids_in(out)
    for part in _parts(out):
        done |= _ids_in(part)
    proc.wait()  # everyone has read the done set before anyone appends
    out_dir = out.parent.resolve()
    mine, paths = [], {}
    for k, p, _ in items:
        if k in done or shard_of(k, proc.world) != proc.rank:
            continue
        rel = _text_path(p, out_dir)
        if rel is None:
            result.skip(display_path(p), NOT_UTF8_NAME)
            continue
        mine.append((k, p))
        paths[k] = (p, rel)
    group_of = {k: g for k, _, g in items}
    result.counts["images"] = len(items)
    result.counts["already_done"] = sum(1 for k, _, _ in items if k in done)
    target = out if proc.world == 1 else part_path(out, proc.rank)
    workers = default_workers() if config.num_workers is None else config.num_workers
    model = _Captioner(config, proc.device, out)
    captioned = empty = 0
    rate = Rate("img")
    with JsonlAppender(target) as writer, make_progress() as progress:
        task = progress.add_task("captioning" + (f" [{proc.rank}/{proc.world}]" if proc.world > 1 else ""),
                                 total=len(mine), rate="")
        for ids, images, bad in iter_image_batches(mine, _identity, _as_list, config.batch_size, workers) if mine else ():
            for key, reason in bad:
                if config.strict:
                    raise ImageError(display_path(paths[key][0]), reason)
                result.skip(key, reason)
            if ids:
                texts = caption_images(model.get(), images, model.prompt, settings)
                for key, text in zip(ids, texts, strict=True):
                    empty += not text.strip()
                    captioned += writer.write(Caption(
                        id=key, image=paths[key][1], caption=text, model=model.cap.model_id, prompt=model.prompt,
                        settings=settings.to_dict(), group=group_of.get(key)))
            progress.update(task, advance=len(ids) + len(bad), rate=rate.add(len(ids) + len(bad)))
    proc.wait()
    if proc.is_main:
        merged = merge_parts(out)
        if merged:
            result.counts["merged_from_parts"] = merged
    result.counts["captioned"] = captioned
    result.counts["empty"] = empty
    if writer.duplicates:
        result.counts["duplicate_ids_in_output"] = len(writer.duplicates)
    if model.cap is None:
        result.details["nothing_to_do"] = True
        log.info("%s: nothing to do: %d of %d images already captioned%s", out, result.counts["already_done"],
                 len(items), f", {len(result.skipped)} skipped" if result.skipped else "")
    result.details.update(model=config.model, prompt=model.prompt, settings=settings.to_dict(),
                          process=f"{proc.rank}/{proc.world}")


# --------------------------------------------------------------------------- import


def _read_any(path: Path) -> list[tuple[str, int | None, Any]]:
    """``(where, line, row)`` for each row of a captions file to import (JSONL, CSV or JSON)."""
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
        if not isinstance(value, str):
            raise RecordError(where, line, f"expected a string, got {value!r:.60}", name)
    if row.get("id") not in (None, "") and (not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool)):
        raise RecordError(where, line, f"expected a string, got {row['id']!r:.60}", "id")
    key = str(row.get("id") or Path(image).with_suffix("").as_posix())
    extra = {k: v for k, v in row.items() if k not in ("id", "image", "caption", "model", "prompt",
                                                       "settings", "group") and v not in (None, "")}
    fields = {"id": key, "caption": text, "model": str(row.get("model") or "imported"),
              "prompt": row.get("prompt") or None, "settings": row.get("settings") or None,
              "group": None if row.get("group") in (None, "") else str(row["group"]),
              **extra, "imported_from": str(source)}
    return key, image, fields


def import_captions(source: Path, output: Path, strict: bool = False, wait: bool = False) -> StageResult:
    """Copy captions from ``source`` into ``output``'s format, image paths made relative to ``output``."""
    result = StageResult("caption")
    source, output = Path(source), Path(output)
    if not source.exists():
        raise CirkitError(f"{source}: no such file to import")
    if source.is_dir():
        raise CirkitError(f"{source}: is a folder; --from takes a captions file (.jsonl, .csv or .json)")
    check_file_output(output)
    check_not_input(output, source)
    check_output_kind(output, Caption)
    with timed(result), output_lock(output, wait=wait, what="captions file"):
        rows = _read_any(source)
        out_dir = output.parent.resolve()
        seen: dict[str, str] = {}
        records: list[tuple[str, str, int | None, Path, dict[str, Any]]] = []
        for where, line, row in rows:  # every row is checked before anything is written
            key, image, fields = _import_record(where, line, row, source)
            at = f"{where}:{line}" if line else where
            if key in seen:
                raise RecordError(where, line, f"duplicate id {key!r} (first at {seen[key]})", "id")
            seen[key] = at
            Caption.from_dict({**fields, "image": image}, where, line)
            records.append((at, where, line, resolve_path(image, source.parent), fields))
        imported = 0
        with JsonlAppender(output) as writer:
            for at, where, line, path, fields in records:
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
