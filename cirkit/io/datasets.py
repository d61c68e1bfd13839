"""The input layer: a Hugging Face dataset wherever a stage reads images or records.

Every stage that takes an image folder or a JSONL also takes a dataset (``datasets`` is the
engine; nothing here re-implements a format):

* a ``save_to_disk`` folder (``Dataset`` or ``DatasetDict``): :func:`datasets.load_from_disk`;
* local data files, a folder of them or a glob: ``.parquet``, ``.arrow``, webdataset ``.tar``
  shards: :func:`datasets.load_dataset` with the matching builder;
* an image folder read by datasets' own ``imagefolder`` builder (``--input-format
  imagefolder``: its ``metadata.jsonl``/``.csv`` columns come along), where a plain folder keeps
  cirkit's own listing (ids = relative paths);
* a Hub id (``owner/name`` that is not a local path, or ``hf://datasets/owner/name``); offline
  (``HF_HUB_OFFLINE=1``) that is one line saying so, never a download attempt.

Columns: ``--image-column`` (an ``Image`` feature or a column of paths, relative to the
data files' folder), ``--id-column`` (default ``id``, then webdataset's ``__key__``, else the
row number), ``--text-column`` (the caption, instruction or query text, per stage).
``--dataset-split`` picks the split (``train``, or the only one). ``--streaming`` reads the
dataset as it goes instead of preparing it under ``HF_DATASETS_CACHE`` first, for collections
that do not fit on disk (ids then come from a column: row numbers are not stable in a stream).

Images stay where they are: a row's image is read, by :func:`cirkit.io.open_image` with its
usual limits, when a DataLoader worker decodes it (:class:`DatasetImage`). Under ``accelerate
launch`` a dataset is split between processes by :func:`datasets.distributed.split_dataset_by_node`
(:func:`for_process`).

Settings are declared once, here (``*_setting``), and used by each stage's config dataclass.
This module imports ``datasets`` only inside functions: ``cirkit --help`` reads it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirkit.config import setting
from cirkit.errors import CirkitError, ImageError

log = logging.getLogger("cirkit")

PANEL = "Dataset input"
FORMATS = ("auto", "disk", "imagefolder", "parquet", "arrow", "webdataset", "json", "csv")
# data files that make an input a dataset by their name alone
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_path", "path", "file_name")
ID_COLUMNS = ("id", "__key__", "key", "image_id")
# names that are never a hub id, so a missing file with one is reported as missing
LOCAL_SUFFIXES = frozenset({".jsonl", ".json", ".csv", ".txt", ".lance", ".yaml", ".yml", ".png", ".jpg", ".jpeg",
                            ".webp", ".bmp", ".gif", ".tif", ".tiff", *FILE_BUILDERS})
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HF_URI = re.compile(r"^hf:/+datasets/")  # hf://datasets/..., also as a Path prints it (hf:/datasets/...)


def _text(source: str | Path) -> str:
    return HF_URI.sub("hf://datasets/", str(source))


# -- settings (declared once; each stage's config uses them) -----------------------------------
def image_column_setting(what: str = "images") -> Any:
    return setting(None, help=f"Dataset column with the {what} (an Image feature, bytes or file paths).",
                   show_default="the first Image column, else image/jpg/png", panel=PANEL)


def id_column_setting() -> Any:
    return setting(None, help="Dataset column with the ids.", show_default="id or __key__, else the row number",
                   panel=PANEL)


def text_column_setting(what: str, default_names: str) -> Any:
    return setting(None, help=f"Dataset column with the {what}.", show_default=default_names, panel=PANEL)


def dataset_split_setting() -> Any:
    return setting(None, help="Split of a dataset input.", show_default="train, or its only split", panel=PANEL)


def streaming_setting() -> Any:
    return setting(False, help="Stream a dataset input as it is read instead of preparing it on disk first "
                               "(for collections that do not fit; ids must come from a column).", panel=PANEL)


def input_format_setting() -> Any:
    return setting("auto", choices=FORMATS, panel=PANEL,
                   help="How to read the input: auto (folder, JSONL, or a dataset by its name), or a datasets "
                        "builder (imagefolder reads a folder with its metadata.jsonl through datasets).")


@dataclass(frozen=True)
class DatasetOptions:
    """The dataset settings of one stage's config (absent ones at their defaults)."""

    image_column: str | None = None
    id_column: str | None = None
    text_column: str | None = None
    split: str | None = None
    streaming: bool = False
    format: str = "auto"

    @classmethod
    def of(cls, config: Any) -> DatasetOptions:
        g = lambda name, default=None: getattr(config, name, default)  # noqa: E731
        return cls(g("image_column"), g("id_column"), g("text_column"), g("dataset_split"),
                   bool(g("streaming", False)), g("input_format", "auto") or "auto")


# -- what the input is -------------------------------------------------------------------------
def _saved(folder: Path) -> bool:
    """Whether ``folder`` was written by ``save_to_disk``."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FILE_BUILDERS
                  and not p.name.startswith("."))


def is_dataset(source: str | Path | None, options: DatasetOptions | None = None) -> bool:
    """Whether ``source`` is read as a Hugging Face dataset (rather than cirkit's folder/JSONL reading)."""
    if source is None:
        return False
    if options is not None and options.format != "auto":
        return True
    text = _text(source)
    if text.startswith("hf://"):
        return True
    p = Path(text)
    if p.is_dir():
        if _saved(p):
            return True
        from cirkit.io.images import IMAGE_EXTENSIONS

        files = [q for q in p.rglob("*") if q.is_file()]
        return any(q.suffix.lower() in FILE_BUILDERS for q in files) and not any(
            q.suffix.lower() in IMAGE_EXTENSIONS for q in files)
    if p.is_file():
        return p.suffix.lower() in FILE_BUILDERS
    if any(ch in text for ch in "*?["):
        return True
    return bool(HUB_ID.match(text)) and p.suffix.lower() not in LOCAL_SUFFIXES


def _builder(files: list[Path], fmt: str, where: str) -> str:
    if fmt not in ("auto", "disk", "imagefolder"):
        return fmt
    kinds = {FILE_BUILDERS.get(p.suffix.lower()) for p in files}
    if len(kinds) != 1 or None in kinds:
        raise CirkitError(f"{where}: mixes data files of several kinds ({', '.join(sorted({p.suffix for p in files}))}); "
                          f"give one kind, or name it with --input-format")
    return kinds.pop()


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with datasets
        return True


def _pick_split(loaded: Any, split: str | None, where: str) -> Any:
    """One split of what ``load_dataset``/``load_from_disk`` returned (a dict of splits, or one split)."""
    if not hasattr(loaded, "keys"):  # already one split
        return loaded
    names = list(loaded.keys())
    if split is not None:
        if split not in names:
            raise CirkitError(f"{where}: has no split {split!r}; it has {', '.join(names)} (--dataset-split)")
        return loaded[split]
    if "train" in names or len(names) == 1:
        return loaded["train" if "train" in names else names[0]]
    raise CirkitError(f"{where}: has the splits {', '.join(names)}; choose one with --dataset-split")


def load(source: str | Path, options: DatasetOptions | None = None):
    """The dataset behind ``source``: one split, a ``Dataset`` (or an ``IterableDataset`` when streaming).

    Every failure a user can cause is one line naming ``source``.
    """
    import datasets

    options = options or DatasetOptions()
    datasets.disable_progress_bars()  # cirkit shows its own progress; datasets' bars would interleave
    datasets.logging.set_verbosity_error()
    where, text, fmt = _text(source), _text(source), options.format
    p = Path(text)
    try:
        if fmt in ("auto", "disk") and p.is_dir() and _saved(p):
            ds = _pick_split(datasets.load_from_disk(str(p)), options.split, where)
            if options.streaming:
                ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 64)))
            return ds
        if fmt == "disk":
            raise CirkitError(f"{where}: not a folder written by save_to_disk (no dataset_info.json/state.json)")
        if fmt == "imagefolder":
            if not p.is_dir():
                raise CirkitError(f"{where}: --input-format imagefolder needs a folder of images")
            loaded = datasets.load_dataset("imagefolder", data_dir=str(p), streaming=options.streaming)
            return _pick_split(loaded, options.split, where)
        files = _local_files(p, text)
        if files:
            builder = _builder(files, fmt, where)
            loaded = datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]},
                                           streaming=options.streaming)
            return _pick_split(loaded, options.split, where)
        if p.exists():
            raise CirkitError(f"{where}: holds no dataset files (.parquet, .arrow, .tar, or a save_to_disk folder)")
        return _load_hub(text, options, where)
    except CirkitError:
        raise
    except FileNotFoundError as e:
        raise CirkitError(f"{where}: no such dataset ({_first_line(e)}); check the path or hub id") from None
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise CirkitError(f"{where}: cannot read it as a dataset ({_first_line(e)})") from None
    except Exception as e:  # datasets' own errors (DatasetGenerationError, DatasetNotFoundError, ...)
        if type(e).__module__.split(".")[0] in ("datasets", "huggingface_hub", "pyarrow", "fsspec"):
            raise CirkitError(f"{where}: cannot read it as a dataset ({_first_line(e)})") from None
        raise


def _local_files(p: Path, text: str) -> list[Path]:
    """The data files a local input names: one file, a folder's files, or a glob."""
    if p.is_file():
        return [p]
    if p.is_dir():
        return _data_files(p)
    if any(ch in text for ch in "*?["):
        import glob

        found = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
        if not found:
            raise CirkitError(f"{text}: no files match this pattern")
        return found
    return []


def _load_hub(text: str, options: DatasetOptions, where: str):
    import datasets

    repo = text[len("hf://datasets/"):] if text.startswith("hf://datasets/") else text
    if _hub_offline():
        raise CirkitError(f"{where}: not a local file or folder, and the Hugging Face Hub is offline "
                          f"(HF_HUB_OFFLINE=1), so it cannot be loaded as hub dataset {repo!r}; check the path, "
                          f"or go online to download it")
    try:
        loaded = datasets.load_dataset(repo, streaming=options.streaming)
    except ConnectionError as e:
        raise CirkitError(f"{where}: the Hugging Face Hub cannot be reached ({_first_line(e)}); "
                          f"check the network, or give a local dataset") from None
    return _pick_split(loaded, options.split, where)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- columns -----------------------------------------------------------------------------------
def columns(ds: Any) -> dict[str, Any]:
    """Column name -> feature (None where a stream has not declared its features)."""
    feats = getattr(ds, "features", None)
    if feats:
        return dict(feats)
    names = getattr(ds, "column_names", None)
    if not names:  # a stream whose builder declares nothing: look at the first row
        first = next(iter(ds.take(1)), None) if hasattr(ds, "take") else None
        names = list(first or {})
    return {n: None for n in names}


def _is_image_feature(feature: Any) -> bool:
    return type(feature).__name__ == "Image"


def pick_column(cols: dict[str, Any], given: str | None, names: tuple[str, ...], what: str, flag: str,
                where: str, image: bool = False, required: bool = True) -> str | None:
    """The column to read ``what`` from: ``given``, else the first Image feature (images), else a usual name."""
    if given is not None:
        if given not in cols:
            raise CirkitError(f"{where}: has no column {given!r} ({flag}); its columns are {', '.join(cols)}")
        return given
    if image:
        found = next((n for n, f in cols.items() if _is_image_feature(f)), None)
        if found is not None:
            return found
    found = next((n for n in names if n in cols), None)
    if found is None and required:
        raise CirkitError(f"{where}: no column with the {what} (looked for {', '.join(names)}); "
                          f"its columns are {', '.join(cols)}; name it with {flag}")
    return found


def _raw_images(ds: Any, column: str) -> Any:
    """``ds`` with ``column`` left undecoded: cirkit decodes it itself, with its limits."""
    if _is_image_feature(columns(ds).get(column)):
        from datasets import Image

        return ds.cast_column(column, Image(decode=False))
    return ds


def base_folder(source: str | Path) -> Path | None:
    """Where relative image paths in a dataset are resolved: the data files' folder (None for the Hub)."""
    text = str(source)
    p = Path(text)
    if p.is_dir():
        return p.resolve()
    if p.is_file():
        return p.parent.resolve()
    if any(ch in text for ch in "*?["):
        import glob

        found = sorted(glob.glob(text, recursive=True))
        return Path(found[0]).parent.resolve() if found else None
    return None


def image_value(value: Any, base: Path | None, shown: str) -> bytes | Path:
    """A row's image cell as encoded bytes or a file path (raises :class:`ImageError` when it is neither)."""
    if isinstance(value, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value.strip():
        if "://" in value:
            raise ImageError(shown, f"image URLs are not downloaded ({value[:80]}); give the images as files or bytes")
        path = Path(value)
        if not path.is_absolute():
            if base is None:
                raise ImageError(shown, f"relative image path {value!r} in a hub dataset; give the images as bytes")
            path = base / path
        return path
    if value is not None and hasattr(value, "save"):  # a decoded PIL image (a dataset cast back to decode=True)
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise ImageError(shown, "no image in this row")


class _ImageCells:
    """One image column of a map-style dataset, read row by row (in DataLoader workers)."""

    def __init__(self, ds: Any, column: str, base: Path | None):
        self.ds, self.column, self.base = _raw_images(ds.select_columns([column]), column), column, base

    def source(self, index: int, shown: str) -> bytes | Path:
        return image_value(self.ds[index][self.column], self.base, shown)


class DatasetImage:
    """A dataset row's image, read when decoded: :func:`cirkit.io.open_image` accepts it like a path.

    ``str()`` is ``<dataset>#<id>``: how outputs (a store's ``image`` column, skip lists) name it.
    """

    __slots__ = ("cells", "index", "name")

    def __init__(self, cells: _ImageCells, index: int, name: str):
        self.cells, self.index, self.name = cells, index, name

    def image_source(self) -> bytes | Path:
        return self.cells.source(self.index, self.name)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DatasetImage({self.name!r})"


# -- reading rows ------------------------------------------------------------------------------
@dataclass
class Rows:
    """A loaded dataset split and the columns a stage reads from it."""

    ds: Any
    source: str
    base: Path | None
    image: str | None
    id: str | None
    text: str | None = None

    @property
    def streaming(self) -> bool:
        return not hasattr(self.ds, "__len__")

    def ids(self) -> list[str]:
        """Every row's id (map-style datasets), checked unique."""
        keys = [str(k) for k in self.ds[self.id]] if self.id else [str(i) for i in range(len(self.ds))]
        if len(set(keys)) != len(keys):
            seen: set[str] = set()
            dup = next(k for k in keys if k in seen or seen.add(k))
            raise CirkitError(f"{self.source}: id {dup!r} appears more than once in column {self.id!r}; "
                              f"ids must be unique (name another column with --id-column)")
        return keys

    def label(self, key: str) -> str:
        return f"{self.source}#{key}"


def open_rows(source: str | Path, options: DatasetOptions | None = None, *, image: bool = True,
              text_names: tuple[str, ...] = (), text_what: str = "text", text_required: bool = False) -> Rows:
    """Load ``source`` and find its id, image and (optionally) text columns."""
    options = options or DatasetOptions()
    ds = load(source, options)
    where = str(source)
    cols = columns(ds)
    if not cols:
        raise CirkitError(f"{where}: the dataset has no columns (is it empty?)")
    img = pick_column(cols, options.image_column, IMAGE_COLUMNS, "images", "--image-column", where,
                      image=True) if image else None
    key = pick_column(cols, options.id_column, ID_COLUMNS, "ids", "--id-column", where, required=False)
    if key is None and options.streaming:
        raise CirkitError(f"{where}: a streamed dataset needs an id column (row numbers are not stable in a "
                          f"stream); name one with --id-column (its columns are {', '.join(cols)})")
    text = pick_column(cols, options.text_column, text_names, text_what, "--text-column", where,
                       required=text_required) if text_names or options.text_column else None
    return Rows(ds, where, base_folder(source), img, key, text)


def for_process(ds: Any, rank: int, world: int) -> Any:
    """This process's share of a dataset: :func:`datasets.distributed.split_dataset_by_node`."""
    if world <= 1:
        return ds
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(ds, rank=rank, world_size=world)


def image_items(source: str | Path, options: DatasetOptions | None = None, rank: int = 0,
                world: int = 1, limit: int | None = None) -> list[tuple[str, Any]]:
    """``(id, image)`` of a map-style dataset (this process's share under ``world`` processes).

    A column of paths gives file paths (resolved against the data files' folder); an Image
    column gives :class:`DatasetImage` references read when decoded. ``limit``: the first rows only.
    """
    rows = open_rows(source, options)
    if rows.streaming:
        raise CirkitError(f"{source}: this stage reads the dataset by row; leave out --streaming")
    ids = rows.ids()  # all of them: ids must be unique across the whole dataset
    if limit is not None:
        ids = ids[:limit]
    indices: Any = range(len(ids))
    if world > 1:  # the rows split_dataset_by_node gives this process (as if splitting the dataset itself)
        from datasets import Dataset

        indices = for_process(Dataset.from_dict({"row": list(indices)}), rank, world)["row"]
    feature = columns(rows.ds).get(rows.image)
    if feature is not None and not _is_image_feature(feature) and getattr(feature, "dtype", "") in ("string",
                                                                                                  "large_string"):
        col = rows.ds[rows.image]
        out = []
        for i in indices:
            try:
                out.append((ids[i], image_value(col[i], rows.base, rows.label(ids[i]))))
            except ImageError as e:
                out.append((ids[i], _Missing(rows.label(ids[i]), e.reason)))
        return out
    cells = _ImageCells(rows.ds, rows.image, rows.base)
    return [(ids[i], DatasetImage(cells, i, rows.label(ids[i]))) for i in indices]


class _Missing:
    """A row whose image cell is unusable: decoding it reports why (counted as a skip like any bad image)."""

    __slots__ = ("name", "reason")

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def image_source(self):
        raise ImageError(self.name, self.reason)

    def __str__(self) -> str:
        return self.name


@dataclass
class ImageStream:
    """A streamed dataset's ``(id, image)`` for one process, read as it comes.

    Split between processes (``rank`` of ``world``) by :func:`datasets.distributed.split_dataset_by_node`;
    inside a DataLoader worker, ``datasets`` itself gives each worker its own shards (so a
    single-file stream keeps one worker busy: write several shards for more). Ids in ``skip``
    (already stored) are passed over before their image is decoded.
    """

    source: str
    options: DatasetOptions
    rank: int = 0
    world: int = 1
    skip: frozenset[str] | set[str] = frozenset()

    def iterate(self) -> Iterator[tuple[str, Any]]:
        rows = open_rows(self.source, self.options)
        ds = _raw_images(rows.ds, rows.image).select_columns(list(dict.fromkeys([rows.id, rows.image])))
        for row in for_process(ds, self.rank, self.world):
            key = str(row[rows.id])
            if key in self.skip:
                continue
            try:
                src = image_value(row[rows.image], rows.base, rows.label(key))
                yield key, src if isinstance(src, Path) else _Loaded(rows.label(key), src)
            except ImageError as e:
                yield key, _Missing(rows.label(key), e.reason)

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self.iterate()


# -- records (captions, triplets, queries) from a dataset ------------------------------------------
def raw_rows(rows: Rows) -> Iterator[dict[str, Any]]:
    """Every row of a dataset as a plain dict, its Image columns left undecoded (``{"bytes", "path"}``)."""
    ds = rows.ds
    for name, feature in columns(ds).items():
        if _is_image_feature(feature):
            ds = _raw_images(ds, name)
    return iter(ds)


def image_cell(row: dict[str, Any], column: str, rows: Rows, key: str, cells: dict[str, _ImageCells],
               index: int) -> Any:
    """A record's image field from a row: a path string when it names a file, else a :class:`DatasetImage`."""
    value = row.get(column)
    shown = f"{rows.label(key)}.{column}"
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        value = value["path"]
    if isinstance(value, str):
        return str(image_value(value, rows.base, shown))
    if rows.streaming:  # no row to come back to: keep the bytes
        try:
            return _Loaded(shown, image_value(value, rows.base, shown))
        except ImageError as e:
            return _Missing(shown, e.reason)
    if column not in cells:
        cells[column] = _ImageCells(rows.ds, column, rows.base)
    return DatasetImage(cells[column], index, shown)


class _Loaded:
    """A streamed row's image, already read (bytes or a path)."""

    __slots__ = ("name", "source")

    def __init__(self, name: str, source: bytes | Path):
        self.name, self.source = name, source

    def image_source(self) -> bytes | Path:
        return self.source

    def __str__(self) -> str:
        return self.name


def export_image(image: Any, folder: Path) -> Path:
    """Write a dataset row's image into ``folder`` once (named by its content) and return the file.

    Used where an output must name an image file (captions that ``train`` and ``reformulate``
    read later). The name is the content's hash, so a re-run or a second copy writes nothing new.
    """
    from cirkit.io.atomic import atomic_write

    src = image.image_source() if hasattr(image, "image_source") else image
    if isinstance(src, Path):
        return src
    data = bytes(src)
    ext = _extension(data)
    out = folder / f"{hashlib.sha256(data).hexdigest()[:24]}{ext}"
    if not out.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(out, "wb", encoding=None) as fh:
            fh.write(data)
    return out


def _extension(data: bytes) -> str:
    """The file extension of encoded image bytes, from their signature."""
    signatures = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
                  (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))
    for magic, ext in signatures:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".img"


def as_image(value: Any) -> Any:
    """A record's image field ready for :func:`cirkit.io.open_image`: a path string as a Path, a dataset image as is."""
    return Path(value) if isinstance(value, str) else value


def records(source: str | Path, options: DatasetOptions, cls: type, image_fields: tuple[str, ...],
            text_field: str, text_names: tuple[str, ...]) -> list[Any]:
    """A dataset's rows as ``cls`` records (captions or triplets), validated like JSONL lines.

    Columns take the record's field names (``id``, ``reference``, ``instruction``, ...), with
    ``--id-column``/``--text-column``/``--image-column`` (the single image of a caption) naming
    others; a webdataset sample's ``.json`` member supplies fields too. Image fields become file
    paths (which must exist) or :class:`DatasetImage` references to the row's image bytes.
    """
    from cirkit.errors import RecordError

    rows = open_rows(source, options, image=False)
    cols = list(columns(rows.ds))
    where = str(source)
    text_col = pick_column(dict.fromkeys(cols), options.text_column, (text_field, *text_names), text_field,
                           "--text-column", where)
    image_cols = {}
    for f in image_fields:
        given = options.image_column if len(image_fields) == 1 else None
        image_cols[f] = pick_column(columns(rows.ds), given, (f, *IMAGE_COLUMNS) if len(image_fields) == 1 else (f,),
                                    f"{f} images", "--image-column", where, image=len(image_fields) == 1)
    fields = {f for f in cls.__dataclass_fields__ if f != "extra"}
    out, cells = [], {}
    for n, row in enumerate(raw_rows(rows)):
        obj = dict(row["json"]) if isinstance(row.get("json"), dict) else {}
        obj.update({k: v for k, v in row.items() if k in fields and v is not None and k not in image_fields})
        key = str(row[rows.id]) if rows.id else str(obj.get("id", n))
        obj["id"] = key
        obj[text_field] = row.get(text_col)
        for f in image_fields:
            obj[f] = rows.label(key)  # a placeholder string while the record is checked
        rec = cls.from_dict(obj, where, n + 1)
        for f, col in image_cols.items():
            image = image_cell(row, col, rows, key, cells, n)
            if isinstance(image, str) and not Path(image).exists():
                raise RecordError(where, n + 1, f"image {image} does not exist", col)
            setattr(rec, f, image)
        out.append(rec)
    return out
