"""The contract between the generic training loop and a trainable backbone.

The loop (:mod:`cirkit.train.loop`) owns accelerate, optimiser, scheduler, progress,
the metrics log, atomic checkpoint saves and exact resume. A plugin owns the model:
how to build it, what a batch is, the loss, per-step hooks (EMA), and how its weights
are written into a checkpoint folder that ``load_backbone`` can read back.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cirkit.errors import CirkitError
from cirkit.train.config import TrainConfig  # noqa: F401 (re-exported: its home is train/config.py)


class TrainPlugin(abc.ABC):
    """One trainable backbone family, as seen by the training loop."""

    name: str = "base"

    def __init__(self, config: TrainConfig):
        self.config = config

    @abc.abstractmethod
    def build(self) -> torch.nn.Module:
        """Create the model: from ``config.init`` if set, else fresh/pretrained from ``config.model``."""

    @abc.abstractmethod
    def dataset(self) -> tuple[torch.utils.data.Dataset, Callable[[list[Any]], Any]]:
        """The training examples for ``config.stage`` read from ``config.data``, and their collate fn."""

    def training_records(self, *image_fields: str) -> tuple[Path, list[Any]]:
        """``config.data`` read as the stage's records: captions for stage 1, triplets otherwise.

        The ``image_fields`` of every record are resolved against the file's folder in place and
        must exist; a missing image is an error naming the file, line and field.
        """
        from cirkit.errors import RecordError
        from cirkit.io import read_jsonl
        from cirkit.io.datasets import DatasetOptions, is_dataset, records
        from cirkit.records import Caption, Triplet, resolve_path

        c = self.config
        if c.data is None:
            need = "captions.jsonl" if c.stage == "1" else "triplets.jsonl"
            raise CirkitError(f"no training data: pass DATA (a {need}) or set 'data' in the recipe")
        path = Path(c.data)
        cls = Caption if c.stage == "1" else Triplet
        options = DatasetOptions.of(c)
        if is_dataset(c.data, options):  # a dataset of captions or triplets (images as bytes or paths)
            text = ("caption", ("text", "txt")) if c.stage == "1" else ("instruction", ("text", "txt"))
            return path, records(c.data, options, cls, image_fields, text[0], text[1])
        records = []
        for lineno, obj in read_jsonl(path):
            rec = cls.from_dict(obj, path, lineno)
            for f in image_fields:
                p = resolve_path(getattr(rec, f), path.parent)
                if not p.exists():
                    raise RecordError(path, lineno, f"image {p} does not exist", f)
                setattr(rec, f, str(p))
            records.append(rec)
        return path, records

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for one batch and scalar logs (e.g. accuracy, temperature)."""

    def parameters(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Optimiser parameter groups (default: trainable params, no decay on norms/biases)."""
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in n or "bias" in n else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def prepare(self, model: torch.nn.Module) -> None:  # noqa: B027 (optional hook)
        """Hook after ``accelerator.prepare`` (and after resume put back the trainable weights),
        before :meth:`load_state_dict`: create what the loss needs beside the model (the EMA target)."""

    def after_step(self, model: torch.nn.Module, step: int) -> None:  # noqa: B027 (optional hook)
        """Hook after each optimiser step (EMA update)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Extra tensors to checkpoint for exact resume (e.g. the EMA target encoder)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`state_dict` returned."""

    @abc.abstractmethod
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """Write the model files + ``config.json`` (through :func:`cirkit.checkpoint.write_config`)."""


@dataclass(frozen=True)
class Unreadable:
    """A training example whose image could not be decoded: datasets return it instead of raising
    (an exception in a DataLoader worker reaches the user as a traceback)."""

    path: str
    reason: str


def readable(items: list[Any]) -> tuple[list[Any], list[tuple[str, str]]]:
    """A collate's items split into the readable ones and ``(path, reason)`` of the rest.

    A collate returns a dict carrying ``"skipped"`` (that list) and ``"examples"`` (how many
    were readable); the loop takes both out, counts the skips and stops a batch too small
    for in-batch contrastive training.
    """
    keep = [x for x in items if not isinstance(x, Unreadable)]
    return keep, [(x.path, x.reason) for x in items if isinstance(x, Unreadable)]
