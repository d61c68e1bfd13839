"""The one small interface every model family implements, plus the spec that selects one.

A backbone turns images, texts and composed (image + text) queries into L2-normalised
float32 vectors in one shared space. Image decoding happens in DataLoader workers, so a
backbone exposes a picklable ``image_transform`` and a ``collate``; the ``embed_*``
methods then run on the model's device under ``torch.inference_mode``.

Trainable backbones (``vit``, ``mllm``) additionally implement the training protocol in
:mod:`cirkit.train` and save/load checkpoint folders (see :func:`cirkit.backbones.load_backbone`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cirkit.records import EmbeddingManifest

QUERY_MODES = ("composed", "image", "text", "sum")


@dataclass
class BackboneSpec:
    """How the user named a model.

    ``model`` is an open_clip model name, a hub id, a local path, or a cirkit checkpoint
    folder (a folder with ``config.json`` whose ``backbone`` key names the family).
    ``mode`` chooses the query embedding: ``composed`` (the model's own fusion),
    ``image`` (reference only), ``text`` (modification text only), ``sum`` (normalised
    image + text, the classic late-fusion baseline).
    """

    backbone: str | None = None
    model: str | None = None
    pretrained: str | None = None
    mode: str = "composed"
    device: str | None = None
    precision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class Backbone(abc.ABC):
    """Embeds gallery images and composed queries into one normalised space."""

    name: str = "base"
    dim: int
    device: torch.device = torch.device("cpu")
    # Shorter image side the transform needs; set, it lets JPEGs decode at a reduced DCT scale
    # (twice the model's input side keeps the final resize a real downsample). None: full size.
    decode_size: int | None = None

    def __init__(self, spec: BackboneSpec):
        self.spec = spec
        if spec.mode not in QUERY_MODES:
            from cirkit.errors import CirkitError

            raise CirkitError(f"unknown query mode {spec.mode!r}; choose one of {', '.join(QUERY_MODES)}")

    # -- data loading (picklable, runs in workers) ---------------------------------------
    @abc.abstractmethod
    def image_transform(self) -> Callable[[Any], Any]:
        """A picklable function PIL.Image -> model input, applied in DataLoader workers."""

    def collate(self, items: list[Any]) -> Any:
        """Stack transformed images into a batch (default: torch.stack)."""
        return torch.stack(items)

    # -- embeddings ----------------------------------------------------------------------
    @abc.abstractmethod
    def embed_images(self, batch: Any) -> torch.Tensor:
        """Gallery/target side: a batch of images -> (N, dim) normalised float32 on CPU."""

    @abc.abstractmethod
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Text side (captions, text-only queries) -> (N, dim) normalised."""

    @abc.abstractmethod
    def embed_composed(self, batch: Any, texts: list[str]) -> torch.Tensor:
        """The model's own fusion of reference images and modification texts."""

    def embed_queries(self, batch: Any | None, texts: list[str] | None) -> torch.Tensor:
        """Query side, honouring ``spec.mode``; a missing image or text falls back to the other."""
        mode = self.spec.mode
        if batch is None or mode == "text":
            return self.embed_texts(list(texts or []))
        if not texts or mode == "image" or all(not (t or "").strip() for t in texts):
            return self.embed_image_queries(batch)
        if mode == "sum":
            return normalize(self.embed_image_queries(batch) + self.embed_texts(list(texts)))
        return self.embed_composed(batch, list(texts))

    def embed_image_queries(self, batch: Any) -> torch.Tensor:
        """Image-only query; by default the same as the gallery side."""
        return self.embed_images(batch)

    # -- provenance ----------------------------------------------------------------------
    def manifest(self) -> EmbeddingManifest:
        """What produced these vectors: recorded in embedding stores, indexes and metrics.

        Family-specific provenance (precision, prompt templates) goes in ``extra``.
        """
        return EmbeddingManifest(
            backbone=self.name,
            checkpoint=self.checkpoint_id(),
            dim=int(self.dim),
            normalized=True,
            mode=self.spec.mode,
            source=_source(self.spec.model),
            pretrained=self.spec.pretrained,
        )

    def checkpoint_id(self) -> str:
        s = self.spec
        return f"{s.model}" + (f"@{s.pretrained}" if s.pretrained else "")


def _source(model: str | None) -> str | None:
    """A model reference that loads from anywhere: local paths made absolute, names kept."""
    if model and Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    return model
