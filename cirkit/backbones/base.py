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


def needs(mode: str) -> str:
    """What a query must have for ``mode`` ("" when either input will do)."""
    return {"image": "a reference image", "text": "a modification text"}.get(mode, "")


def query_fits(mode: str, has_image: bool, texts: list[str] | None) -> bool:
    """Whether queries with (or without) an image and these texts can be answered in ``mode``."""
    if mode == "image":
        return has_image
    if mode == "text":
        return bool(texts) and all((t or "").strip() for t in texts)
    return True


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
        """Query side, honouring ``spec.mode``; a missing image or text falls back to the other.

        Except in the single-input baselines: ``image`` mode without a reference image, or
        ``text`` mode without a text, is an error rather than the other input in disguise (a
        text-only query answered in ``image`` mode would score the text baseline under the
        image baseline's name). :func:`needs` says which queries a mode can answer.

        The fallback is decided per query: a blank text (CIRR test1 has ``" "``) makes that
        query image-only whatever else is in its batch, so a ranking never depends on
        ``--batch-size``.
        """
        mode = self.spec.mode
        if not query_fits(mode, batch is not None, texts):
            from cirkit.errors import CirkitError

            raise CirkitError(f"query mode {mode!r} needs {needs(mode)}; this query has none "
                              f"(use --mode composed or sum, or give {needs(mode)})")
        if batch is None or mode == "text":
            return self.embed_texts(list(texts or []))
        texts = list(texts or [])
        blank = [not (t or "").strip() for t in texts] if texts else []
        if mode == "image" or not texts or all(blank):
            return self.embed_image_queries(batch)
        if any(blank):
            keep = [i for i, b in enumerate(blank) if not b]
            alone = [i for i, b in enumerate(blank) if b]
            with_text = self._queries_with_text(_rows(batch, keep), [texts[i] for i in keep], mode)
            image_only = self.embed_image_queries(_rows(batch, alone))
            out = torch.empty(len(texts), with_text.shape[1], dtype=with_text.dtype)
            out[keep], out[alone] = with_text, image_only.to(with_text.dtype)
            return out
        return self._queries_with_text(batch, texts, mode)

    def _queries_with_text(self, batch: Any, texts: list[str], mode: str) -> torch.Tensor:
        if mode == "sum":
            return normalize(self.embed_image_queries(batch) + self.embed_texts(texts))
        return self.embed_composed(batch, texts)

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


def _rows(batch: Any, keep: list[int]) -> Any:
    """The ``keep`` rows of a collated batch: a tensor (stacked images) or a list (PIL images)."""
    if isinstance(batch, torch.Tensor):
        return batch[torch.tensor(keep, device=batch.device)]
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch[i] for i in keep)
    raise TypeError(f"cannot select rows of a {type(batch).__name__} batch; override Backbone.embed_queries")


def _source(model: str | None) -> str | None:
    """A model reference that loads from anywhere: local paths made absolute, names kept."""
    if model and Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    return model
