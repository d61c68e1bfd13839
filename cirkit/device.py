"""Device and precision: the one place that turns ``--device`` and ``--precision`` into torch objects.

Every stage that loads a model (the ``clip``/``vit``/``mllm`` backbones, ``caption``,
``reformulate``, the text embedder and the training loop) resolves its device with
:func:`pick_device` and its precision with :func:`pick_dtype` (or :func:`mixed_precision`
for accelerate), so one string means one thing everywhere and an unknown one is the same
one-line error everywhere (the torchtune ``training/precision.py`` pattern: one table,
validated on the way in).

Precision names (case-insensitive): ``auto``; ``fp32``/``float32``; ``bf16``/``bfloat16``;
``fp16``/``float16``/``half``. ``None`` or ``""`` mean ``auto``.

``auto`` is bf16 on CUDA GPUs with native bf16 (compute capability 8.0+, or ROCm) and fp32
everywhere else. In particular it stays fp32 on Apple MPS and on older CUDA GPUs: fp16 has
a 65504 ceiling that LLM activations can exceed (NaNs with no error), and bf16 on MPS needs
macOS 14+, so half precision there is something to ask for, never a silent default. An
explicit choice is honoured on any device (torch runs fp16 and bf16 on CPU, just slower).

The module also holds where a process sits in a distributed run (:class:`ProcessInfo`,
:func:`process_info`) and how work is split between processes (:func:`shard_of`).
torch and accelerate are imported inside the functions that need them.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Any

from cirkit.errors import CirkitError

# Every accepted spelling -> its canonical name. The canonical names are also open_clip's
# ``precision`` values and (but for fp32, which is "no") accelerate's ``mixed_precision``.
PRECISIONS: dict[str, str] = {
    "auto": "auto",
    "fp32": "fp32", "float32": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
}
PRECISION_CHOICES = "auto, fp32, bf16 or fp16 (also float32, bfloat16, float16, half)"
_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


# --------------------------------------------------------------------------- devices


def pick_device(name: str | None = None):
    """The ``torch.device`` for ``--device``: ``None``/``auto`` = CUDA, else MPS, else CPU.

    A named device is checked to exist here, so ``cuda:7`` on a one-GPU machine (or ``cuda``
    on a machine without one) is a one-line error before any model loads.
    """
    import torch

    text = "" if name is None else str(name).strip().lower()
    if text in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise CirkitError(f"unknown device {name!r}: use {DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CirkitError(f"device {name!r}: CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise CirkitError(f"device {name!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
        return dev
    if dev.type == "mps":
        if not _mps_available():
            raise CirkitError(f"device {name!r}: Apple MPS is not available on this machine; use --device cpu")
        return dev
    raise CirkitError(f"device {name!r}: cirkit runs on {DEVICE_CHOICES}")


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


# --------------------------------------------------------------------------- precision


def precision_name(precision: str | None) -> str:
    """The canonical name (``auto``, ``fp32``, ``bf16``, ``fp16``) of a precision string; torch-free."""
    if precision is None:
        return "auto"
    key = str(precision).strip().lower()
    if key == "":
        return "auto"
    try:
        return PRECISIONS[key]
    except KeyError:
        raise CirkitError(f"unknown precision {precision!r}: choose {PRECISION_CHOICES}") from None


def resolve_precision(precision: str | None, device: Any = None) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for this device: ``auto`` resolved (see the module docstring).

    ``device``: a ``torch.device`` or a device string; ``None`` means the one
    :func:`pick_device` would choose.
    """
    name = precision_name(precision)
    if name != "auto":
        return name
    import torch

    dev = device if isinstance(device, torch.device) else pick_device(device)
    return "bf16" if dev.type == "cuda" and _native_bf16(dev) else "fp32"


def _native_bf16(dev) -> bool:
    """bf16 in hardware on this CUDA device (Ampere and newer, or ROCm), not emulated."""
    import torch

    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).major >= 8


def pick_dtype(precision: str | None, device: Any = None):
    """The ``torch.dtype`` a model runs in on ``device`` for a precision string."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        resolve_precision(precision, device)]


def mixed_precision(precision: str | None, device: Any = None) -> str:
    """accelerate's ``mixed_precision`` (``no``, ``bf16``, ``fp16``) for a precision string."""
    return _ACCELERATE[resolve_precision(precision, device)]


# --------------------------------------------------------------------------- processes


@dataclass
class ProcessInfo:
    """Where this process sits in a (possibly) distributed run."""

    rank: int = 0
    world: int = 1
    device: str | None = None
    state: Any = field(default=None, repr=False)
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The first process of its machine (files only it may touch on a node's own disk)."""
        return self.local_rank == 0

    def wait(self) -> None:
        """Barrier across processes (no-op when alone)."""
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process (``[obj]`` when alone).

        ``torch.distributed.all_gather_object`` through accelerate: any picklable value, over
        the launcher's process group (gloo on CPUs, NCCL on GPUs; several machines alike).
        """
        if self.state is None or self.world <= 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process."""
        if self.state is None or self.world <= 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def process_info() -> ProcessInfo:
    """Rank/world from accelerate's ``PartialState`` under ``accelerate launch``, else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ProcessInfo()
    import torch
    from accelerate import PartialState

    # cpu=True without a GPU: plain torchrun (no accelerate config) then still forms a gloo group
    state = PartialState(cpu=not torch.cuda.is_available())
    return ProcessInfo(rank=state.process_index, world=state.num_processes, device=str(state.device), state=state,
                       local_rank=state.local_process_index)


def shard_of(key: str, world: int) -> int:
    """The process that owns ``key``: a stable hash, so the split never depends on what is done."""
    return zlib.crc32(key.encode("utf-8")) % world if world > 1 else 0


def my_share(items: list[Any], proc: ProcessInfo, key: Any = None) -> list[Any]:
    """This process's items of a list every process holds whole: those whose key :func:`shard_of` gives it.

    ``key(item)`` is the item's id (default: ``item[0]``). The split depends only on the ids and
    the number of processes, so every process computes it alone, a re-run with any number of
    processes re-splits what is left, and the union over processes is the list, each item once.
    (A Hugging Face dataset is split with :func:`cirkit.io.datasets.for_process` instead.) This is
    the one sharding rule of caption, embed, evaluate and reformulate.
    """
    if proc.world <= 1:
        return list(items)
    key = key or (lambda item: item[0])
    return [x for x in items if shard_of(str(key(x)), proc.world) == proc.rank]
