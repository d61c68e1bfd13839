"""The checkpoint folder: its files, its ``config.json``, its trainer state, its checks.

A checkpoint is one folder, the contract between training and ``embed``/``query``/``evaluate``
(which need nothing else). This module alone names its files and writes it; a backbone only
maps its weights to and from modules (anchors: torchtune ``training/checkpointing/_utils.py``
constants and ``CheckpointClient``; litgpt ``check_valid_checkpoint_dir``)::

    config.json                  backbone family + architecture         write_config / read_config
    model.safetensors            weights (vit; mllm merged or fully fine-tuned)
    cirkit.json                  instead of config.json where the folder is also a transformers model
                                 (mllm with complete weights): config.json, generation_config.json and
                                 the processor files are then the model's own, so
                                 AutoModelForImageTextToText.from_pretrained(folder) loads it without cirkit
    adapter_config.json          mllm or reformulator LoRA, peft's own files (load with plain peft)
    adapter_model.safetensors
    adapter/                     the same two files in a merged folder (at the top they would make
                                 transformers load the folder as base model + adapter): adapter_folder()
    train_args.json              the run's resolved settings (+ processes, resolved_max_steps)
    metrics.jsonl                one line per logged step
    trainer_state/               exact resume: state.json, model/optimizer/plugin/rng .safetensors
    .cirkit-output.json          the ownership marker (kind ``checkpoint``)

:func:`save` swaps the whole folder in atomically (:func:`cirkit.io.atomic.atomic_dir`), so a
crash leaves the previous checkpoint or the new one, and the next run removes the dead
process's temp folder. Files a user adds to a checkpoint folder are carried into every new
save. Everything here is safetensors or JSON: nothing in a checkpoint is ever unpickled, and
any other weights file is checked by its *content* (:func:`refuse_pickle`) before a library
that would unpickle it sees it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cirkit.errors import CheckpointError, CirkitError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("cirkit")

KIND = "checkpoint"  # the ownership marker's kind
CONFIG = "config.json"
SETTINGS = "cirkit.json"  # cirkit's config in a folder whose config.json is the model library's
WEIGHTS = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_DIR = "adapter"  # where a merged (model) folder keeps its peft adapter
TRAIN_ARGS = "train_args.json"
METRICS = "metrics.jsonl"
STATE_DIR = "trainer_state"
STATE_JSON = "state.json"
STATE_MODEL = "model.safetensors"          # the trainable tensors, by parameter name
STATE_OPTIMIZER = "optimizer.safetensors"
STATE_PLUGIN = "plugin.safetensors"        # e.g. the EMA target encoder
STATE_RNG = "rng.safetensors"
# Every name a checkpoint save writes; anything else in the folder is the user's and is kept.
OWNED = frozenset({CONFIG, SETTINGS, WEIGHTS, ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_DIR, TRAIN_ARGS, METRICS,
                   STATE_DIR, "generation_config.json"})
FAMILIES = ("vit", "mllm", "reformulator")  # backbone families that have checkpoint folders


def _loads(text: str) -> Any:
    from cirkit.io.jsonl import loads

    return loads(text)


# -- config.json ------------------------------------------------------------------------------
def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v))


def _file_name(v: Any) -> bool:
    return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v and "\x00" not in v


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


_STR = (lambda v: isinstance(v, str), "a string")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_INT = (_int, "an integer")
_NUM = (_num, "a number")
# key -> (required, check, what it must be); one table per family, checked on read and on write.
_COMMON = {"cirkit": (True, *_STR), "backbone": (True, *_STR)}
SCHEMA: dict[str, dict[str, tuple[bool, Callable[[Any], bool], str]]] = {
    "vit": {
        "model": (True, *_STR),
        "embed_dim": (False, *_INT),  # informational: the loader measures it from the model
        "pretrained": (False, _opt(_STR[0]), "a string or null"),
        "cross_attn": (False, *_BOOL),
        "cross_attn_layers": (False, _opt(lambda v: isinstance(v, list) and all(map(_int, v))),
                              "a list of block indexes or null"),
        "predictor_hidden": (False, _opt(_int), "an integer or null"),
        "temperature": (False, *_NUM),
        "gate_init": (False, _opt(_num), "a number or null"),
        "null_text": (False, *_STR),
        "combiner_trained": (False, *_BOOL),
        "combiner": (False, lambda v: v in ("weight", "gate"), "'weight' or 'gate'"),
        "quick_gelu": (False, *_BOOL),
        "weights": (False, _file_name, "a file name inside the checkpoint folder"),
        "weights_id": (False, *_STR),
        "has_ema": (False, *_BOOL),
    },
    "mllm": {
        "base_model": (True, *_STR),
        "templates": (False, _opt(lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values())),
                      "a mapping of template name to text"),
        "max_length": (False, *_INT),
        "dim": (False, *_INT),
        "weights": (False, lambda v: v in ("lora", "full"), "'lora' or 'full'"),
        "merged": (False, *_BOOL),
        "lora": (False, _opt(lambda v: isinstance(v, dict)), "a mapping or null"),
        "temperature": (False, _opt(_num), "a number or null"),
        "min_pixels": (False, *_INT),
        "max_pixels": (False, *_INT),
    },
    # A LoRA-tuned instruction writer (cirkit.train.reformulator), read by `cirkit reformulate -m`.
    "reformulator": {
        "base_model": (True, *_STR),
        "gguf_file": (False, _opt(_STR[0]), "a string or null"),
        "model_name": (False, *_STR),
        "system": (True, *_STR),
        "prompt": (True, lambda v: isinstance(v, str) and "{reference}" in v and "{target}" in v,
                   "a string with {reference} and {target}"),
        "lora": (False, _opt(lambda v: isinstance(v, dict)), "a mapping or null"),
        "seed_pairs": (False, lambda v: isinstance(v, list) and all(
            isinstance(x, list) and len(x) == 2 and all(isinstance(y, str) for y in x) for x in v),
            "a list of [caption A, caption B] pairs"),
    },
}


def _problem(data: dict[str, Any]) -> str | None:
    """What is wrong with a cirkit config (a missing or wrong-typed key), or None."""
    backbone = data.get("backbone")
    if backbone not in FAMILIES:
        return f"'backbone' must be one of {', '.join(FAMILIES)}, not {backbone!r}"
    for key, (required, check, what) in {**_COMMON, **SCHEMA[backbone]}.items():
        if key not in data:
            if required:
                return f"missing '{key}' ({what})"
        elif not check(data[key]):
            return f"'{key}' must be {what}, not {data[key]!r}"
    return None


def config_path(folder: str | Path) -> Path:
    """The file holding cirkit's config in ``folder``: ``cirkit.json`` when present, else ``config.json``."""
    p = Path(folder)
    return p / SETTINGS if (p / SETTINGS).is_file() else p / CONFIG


def read_config(folder: str | Path) -> dict[str, Any] | None:
    """cirkit's config of a checkpoint folder (``cirkit.json``, or ``config.json`` in folders that are
    not transformers models and in older checkpoints); None if ``folder`` is not one.

    A folder whose ``config.json`` is not cirkit's (a transformers model folder) is not one.
    A cirkit config that is not JSON, or has a missing or wrong-typed key, is a
    :class:`CheckpointError` naming the file.
    """
    p = Path(folder)
    path = config_path(p)
    if not p.is_dir() or not path.is_file():
        return None
    try:
        data = _loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):  # no model library writes a config that is not an object
        raise CheckpointError(f"{path}: not a JSON object; the checkpoint config is damaged, re-save or re-train it")
    if not ("cirkit" in data or data.get("backbone") in FAMILIES):
        return None
    problem = _problem(data)
    if problem:
        raise CheckpointError(f"{path}: {problem}; the checkpoint config is damaged, re-save or re-train it")
    return data


def write_config(folder: str | Path, backbone: str, *, model_folder: bool = False, **fields: Any) -> dict[str, Any]:
    """Write cirkit's config for ``backbone``: ``fields`` plus the cirkit version and the family.

    ``model_folder``: the folder is also a transformers model folder (its ``config.json`` is the
    model's, :func:`write_model_files`), so cirkit's config goes to ``cirkit.json``.
    """
    from cirkit import __version__
    from cirkit.io import atomic_write_json

    data = {"cirkit": __version__, "backbone": backbone, **fields}
    problem = _problem(data)
    if problem:  # a writer out of step with the schema is a bug, not a user error
        raise ValueError(f"{backbone} config.json would not read back: {problem}")
    atomic_write_json(Path(folder) / (SETTINGS if model_folder else CONFIG), data)
    return data


def adapter_folder(folder: str | Path) -> Path | None:
    """Where ``folder``'s peft adapter is: the folder itself, its ``adapter/`` (merged folders), or None."""
    folder = Path(folder)
    for where in (folder, folder / ADAPTER_DIR):
        if (where / ADAPTER_CONFIG).is_file():
            return where
    return None


def write_model_files(folder: str | Path, model: Any, processor: Any = None) -> None:
    """The files that make ``folder`` a transformers model folder besides its weights: the model's own
    ``config.json`` (its architecture named), ``generation_config.json`` and the processor's files."""
    folder = Path(folder)
    config = model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    config.save_pretrained(str(folder))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(folder))
    if processor is not None:
        processor.save_pretrained(str(folder))


# -- weights files: content, not suffix ----------------------------------------------------------
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def weights_format(path: str | Path) -> str:
    """``safetensors``, ``pickle`` (a torch zip archive, a protocol 2+ pickle, a legacy torch tar) or ``unknown``.

    Decided from the bytes: a safetensors file starts with an 8-byte little-endian header
    length followed by the JSON header's ``{``; torch.save writes a zip (``PK\\x03\\x04``),
    older torch a pickle (``\\x80`` + protocol) or a tar (``ustar`` at byte 257).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if len(head) >= 9:
        n = struct.unpack("<Q", head[:8])[0]
        if head[8:9] == b"{" and 2 <= n <= min(_MAX_HEADER, size - 8):
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) \
            or head[257:262] == b"ustar":
        return "pickle"
    return "unknown"


def refuse_pickle(path: str | Path, allow_pickle: bool) -> str:
    """Refuse a weights file that is not safetensors unless ``allow_pickle``; returns its format.

    Anything that is not safetensors would go through ``torch.load``, i.e. an unpickler,
    whatever its name (``.ckpt``, ``.PT``, ``.pkl``, no suffix).
    """
    fmt = weights_format(path)
    if fmt == "safetensors" or allow_pickle:
        return fmt
    if fmt == "pickle":
        raise CheckpointError(f"{path}: pickle checkpoints can run code when loaded; convert to .safetensors "
                              "or pass --allow-pickle if you trust the file")
    raise CheckpointError(f"{path}: not a safetensors file, and loading it would unpickle it, which can run code; "
                          "convert to .safetensors or pass --allow-pickle if you trust the file")


def check_safetensors(path: str | Path) -> None:
    """A complete safetensors file (header parses, every tensor's bytes present), else a CheckpointError."""
    path = Path(path)
    fix = "the file is damaged or was cut short; re-save or re-train the checkpoint"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if n < 2 or n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (no valid header); {fix}")
            header = _loads(fh.read(n).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a mapping); {fix}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_int, offsets))):
            raise CheckpointError(f"{path}: not a safetensors file (tensor {name!r} has no data offsets); {fix}")
        end = max(end, offsets[1])
    if size < 8 + n + end:
        raise CheckpointError(f"{path}: truncated ({size} bytes, the header promises {8 + n + end}); {fix}")


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a one-line CheckpointError for a damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({str(e).splitlines()[0]}); "
                              "re-save or re-train the checkpoint") from None


def pickle_files(folder: str | Path) -> list[Path]:
    """Files directly in ``folder`` whose content is pickle (torch zip/pickle/tar), by name."""
    folder = Path(folder)
    found = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and weights_format(p) == "pickle":
            found.append(p)
    return found


def check_model_folder(folder: str | Path, allow_pickle: bool) -> None:
    """Refuse a transformers model folder that would load its weights from pickle, unless ``allow_pickle``.

    transformers reads ``model.safetensors`` (or its sharded index) when present and falls
    back to ``pytorch_model*.bin`` through ``torch.load``; which files are pickle is decided
    by content, so renamed pickles are caught too.
    """
    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        check_safetensors(folder / WEIGHTS)
        return
    if (folder / f"{WEIGHTS}.index.json").is_file():
        return
    pickles = pickle_files(folder)
    if pickles and not allow_pickle:
        kinds = ", ".join(sorted({p.suffix or p.name for p in pickles}))
        raise CheckpointError(f"{folder}: only pickle ({kinds}) weights found; convert to safetensors or pass --allow-pickle")


def check_folder(folder: str | Path, backbone: str | None = None) -> dict[str, Any]:
    """The config of a complete cirkit checkpoint folder; else a CheckpointError naming what is missing and the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    cfg = read_config(folder)
    if cfg is None:
        raise CheckpointError(f"{folder}: not a cirkit checkpoint (no {CONFIG})")
    if backbone is not None and cfg["backbone"] != backbone:
        raise CheckpointError(f"{folder}: a {cfg['backbone']} checkpoint, not {backbone}")
    if cfg["backbone"] == "vit":
        weights = [folder / cfg.get("weights", WEIGHTS)]
        if not weights[0].is_file():
            pickles = [p.name for p in pickle_files(folder)]
            if pickles:
                raise CheckpointError(f"{folder}: no {weights[0].name}, only pickle weights ({', '.join(pickles)}); "
                                      "cirkit checkpoints load from safetensors only, never from pickle")
            raise CheckpointError(f"{folder}: missing {weights[0].name}; the checkpoint is incomplete")
    else:
        adapter = adapter_folder(folder) or folder
        weights = [p for p in (folder / WEIGHTS, adapter / ADAPTER_WEIGHTS) if p.is_file()]
        if (adapter / ADAPTER_CONFIG).is_file() and not (adapter / ADAPTER_WEIGHTS).is_file():
            pickles = [p.name for p in pickle_files(adapter)]
            if pickles:
                raise CheckpointError(f"{adapter}: no {ADAPTER_WEIGHTS}, only pickle weights ({', '.join(pickles)}); "
                                      "cirkit checkpoints load from safetensors only, never from pickle")
            raise CheckpointError(f"{adapter}: {ADAPTER_CONFIG} without {ADAPTER_WEIGHTS}; the checkpoint is incomplete")
        if not weights:
            raise CheckpointError(f"{folder}: missing {WEIGHTS} or {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}; "
                                  "the checkpoint is incomplete")
    for w in weights:
        check_safetensors(w)
    return cfg


# -- trainer state (exact resume, safetensors + JSON only) ------------------------------------------
@dataclass
class TrainerState:
    """Everything beyond the weights that exact resume needs (open_clip's TrainState, torchtune's TrainingProgress)."""

    step: int
    max_steps: int
    epoch: int
    trainable: dict[str, Any]                 # name -> tensor of every trainable parameter
    optimizer: dict[str, Any]                 # a torch optimizer state_dict
    scheduler: dict[str, Any]                 # a torch LR scheduler state_dict
    plugin: dict[str, Any] = field(default_factory=dict)  # extra tensors (EMA target)
    rng: tuple[dict[str, Any], dict[str, Any]] | None = None  # (tensors, JSON) from capture_rng


def _optimizer_to_files(opt_state: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, Any], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng(device: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """This process's torch (+ CUDA), Python and NumPy RNG states as (tensors, JSON)."""
    import random

    import numpy as np
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if getattr(device, "type", "cpu") == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    py = random.getstate()
    npy = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])]}
    return tensors, meta


def restore_rng(rng: tuple[dict[str, Any], dict[str, Any]], device: Any) -> None:
    """Put back what :func:`capture_rng` saved."""
    import random

    import numpy as np
    import torch

    tensors, meta = rng
    torch.set_rng_state(tensors["torch"])
    if getattr(device, "type", "cpu") == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {k: _jsonable(v) for k, v in obj.items() if _is_plain(v)}
        return None


def _is_plain(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _cpu(tensors: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_trainer_state(folder: str | Path, state: TrainerState) -> None:
    """Write ``trainer_state/`` into a checkpoint folder being built."""
    from safetensors.torch import save_file

    from cirkit.io import atomic_write_json

    sd = Path(folder) / STATE_DIR
    sd.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(state.trainable), str(sd / STATE_MODEL))
    opt_tensors, opt_meta = _optimizer_to_files(state.optimizer)
    save_file(opt_tensors, str(sd / STATE_OPTIMIZER))
    if state.plugin:
        save_file(_cpu(state.plugin), str(sd / STATE_PLUGIN))
    rng_meta = None
    if state.rng is not None:
        save_file(state.rng[0], str(sd / STATE_RNG))
        rng_meta = state.rng[1]
    atomic_write_json(sd / STATE_JSON, {
        "step": state.step, "max_steps": state.max_steps, "epoch": state.epoch,
        "scheduler": _jsonable(state.scheduler), "optimizer": opt_meta, "rng": rng_meta,
    })


def read_progress(folder: str | Path) -> dict[str, Any] | None:
    """``trainer_state/state.json`` of a checkpoint folder (step, max_steps, ...), or None if it has none."""
    path = Path(folder) / STATE_DIR / STATE_JSON
    if not path.is_file():
        return None
    fix = "the trainer state is damaged; resume is impossible, train into a new --output"
    try:
        data = _loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not valid JSON; {fix}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object; {fix}")
    for key in ("step", "max_steps"):
        if not _int(data.get(key)):
            raise CheckpointError(f"{path}: '{key}' must be an integer, not {data.get(key)!r}; {fix}")
    return data


def load_trainer_state(folder: str | Path) -> TrainerState:
    """Read back what :func:`save_trainer_state` wrote (safetensors + JSON only)."""
    folder = Path(folder)
    meta = read_progress(folder)
    sd = folder / STATE_DIR
    if meta is None:
        raise CheckpointError(f"{folder}: nothing to resume (no {STATE_DIR}/{STATE_JSON}); drop --resume to start fresh")
    missing = [n for n in (STATE_MODEL, STATE_OPTIMIZER, STATE_RNG) if not (sd / n).is_file()]
    if missing:
        raise CheckpointError(f"{sd}: missing {', '.join(missing)}; the trainer state is incomplete, "
                              "resume is impossible, train into a new --output")
    for key in ("scheduler", "optimizer", "rng"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{sd / STATE_JSON}: '{key}' must be a JSON object; the trainer state is damaged, "
                                  "train into a new --output")
    plugin = sd / STATE_PLUGIN
    return TrainerState(
        step=meta["step"], max_steps=meta["max_steps"], epoch=int(meta.get("epoch", 0)),
        trainable=load_safetensors(sd / STATE_MODEL),
        optimizer=_optimizer_from_files(load_safetensors(sd / STATE_OPTIMIZER), meta["optimizer"]),
        scheduler=meta["scheduler"],
        plugin=load_safetensors(plugin) if plugin.is_file() else {},
        rng=(load_safetensors(sd / STATE_RNG), meta["rng"]),
    )


def read_train_args(folder: str | Path) -> dict[str, Any]:
    """``train_args.json`` of a checkpoint folder (the settings its run used)."""
    path = Path(folder) / TRAIN_ARGS
    try:
        data = _loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint has no record of its settings, "
                              "so it cannot be resumed; train into a new --output") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not valid JSON; the checkpoint cannot be resumed, train into a new --output") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object; the checkpoint cannot be resumed, train into a new --output")
    return data


# -- metrics.jsonl (appended between saves, inside the locked output) --------------------------------
def append_metrics(folder: str | Path, record: dict[str, Any]) -> None:
    with open(Path(folder) / METRICS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(folder: str | Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from."""
    path = Path(folder) / METRICS
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    keep = []
    for line in text.splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    if text == "".join(line + "\n" for line in keep):
        return  # nothing was logged past the checkpoint (e.g. the run had finished)
    from cirkit.io import atomic_write

    with atomic_write(path) as fh:
        fh.write("".join(line + "\n" for line in keep))


# -- the output folder: checks before any work, ownership, the save ----------------------------------
def is_checkpoint(folder: Path) -> bool:
    """A checkpoint folder written before folders carried cirkit's marker."""
    try:
        return read_config(folder) is not None
    except CirkitError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: str | Path, inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse, before any work, an output folder a training run must not write.

    ``inputs`` maps how the user named each input (``the training data``, ``--init``) to its
    path. Refused: a link, an existing file, the current folder or one above it, a folder of
    files cirkit did not write (every save replaces the folder whole), and a folder that is,
    holds or sits inside one of the inputs.
    """
    from cirkit.io.atomic import check_replaceable, check_utf8_path

    out = Path(out)
    check_utf8_path(out, "checkpoint folder")  # its config and train args record it, as UTF-8 text
    real = Path(os.path.realpath(out))
    for what, given in inputs.items():
        if not given:
            continue
        src = Path(os.path.realpath(Path(given).expanduser()))
        if not src.exists():
            continue
        if src == real:
            raise CirkitError(f"{out}: is {what} ({given}); write the checkpoint to a new folder")
        if _inside(src, real):
            raise CirkitError(f"{out}: holds {what} ({given}), which the first save would delete; "
                              "write the checkpoint to a new folder")
        if src.is_dir() and _inside(real, src):
            raise CirkitError(f"{out}: is inside {what} ({given}); write the checkpoint to a folder outside it")
    check_replaceable(out, KIND, is_checkpoint)


def open_output(out: str | Path) -> None:
    """Under the output's lock, before reading it: finish an interrupted swap, drop dead saves' temps."""
    from cirkit.io.atomic import remove_dead_temps, restore_dir

    out = Path(out)
    if restore_dir(out):
        log.warning("%s: restored the last checkpoint from a save that was interrupted mid-swap", out)
    if remove_dead_temps(out):
        log.info("%s: removed the temp folder of a save that was killed", out)


def claim_output(out: str | Path, fresh: bool) -> None:
    """Make ``out`` ours before its first save (metrics.jsonl is written there between saves).

    ``fresh``: a new run, so metrics left by a run killed before its first save are dropped.
    """
    from cirkit import __version__
    from cirkit.io.atomic import MARKER

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():
        (out / MARKER).write_text(json.dumps({"kind": KIND, "cirkit": __version__}) + "\n", encoding="utf-8")
    if fresh:
        (out / METRICS).unlink(missing_ok=True)


def unclaim_output(out: str | Path) -> None:
    """Undo :func:`claim_output` when the run stopped before writing anything: remove a folder holding only the marker."""
    from cirkit.io.atomic import MARKER

    out = Path(out)
    try:
        if out.is_dir() and not out.is_symlink() and [p.name for p in out.iterdir()] == [MARKER]:
            (out / MARKER).unlink()
            out.rmdir()
    except OSError:
        pass


def _carry_over(src: Path, dst: Path) -> None:
    """Hard-link (or copy) the user's own files from the live folder into the one being swapped in."""
    from cirkit.io.atomic import MARKER

    for entry in src.iterdir():
        target = dst / entry.name
        if (entry.name in OWNED or entry.name == MARKER or ".cirkit-tmp-" in entry.name
                or ".cirkit-old-" in entry.name or target.exists() or target.is_symlink()):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save(out: str | Path, write_model: Callable[[Path], None], train_args: dict[str, Any],
         state: TrainerState) -> None:
    """Write a whole checkpoint and swap it in: model files (``write_model``), train args, trainer state, metrics."""
    from cirkit.io import atomic_dir, atomic_write_json

    out = Path(out)
    with atomic_dir(out, KIND, is_checkpoint) as tmp:
        write_model(tmp)
        atomic_write_json(tmp / TRAIN_ARGS, train_args)
        save_trainer_state(tmp, state)
        if (out / METRICS).exists():
            shutil.copy2(out / METRICS, tmp / METRICS)
        if out.is_dir():
            _carry_over(out, tmp)
