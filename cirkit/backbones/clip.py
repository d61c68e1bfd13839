"""Zero-shot CLIP baselines through open_clip: image-only, text-only and image+text sum.

These are the baseline rows of Table II in "Scaling Prompt Instructed Zero Shot Composed
Image Retrieval with Image-Only Data": the query is the reference image's embedding
(``image``), the modification text's embedding (``text``), or the normalised sum of both
(``sum``). Plain CLIP has no fusion of its own, so ``composed`` means ``sum`` here.

``model`` is any open_clip model name (``ViT-B-32``, ``ViT-L-14``, ``hf-hub:...``, or
cirkit's own ``cirkit-tiny``/``cirkit-small`` configs); ``pretrained`` an open_clip tag
(``openai``, ``laion2b_s34b_b79k``), a local ``.safetensors`` file, or None for random
init (cirkit's own configs only, for tests).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from cirkit.backbones.base import Backbone, BackboneSpec, normalize
from cirkit.records import EmbeddingManifest

log = logging.getLogger("cirkit")

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"


class ClipBackbone(Backbone):
    """open_clip CLIP as a zero-shot CIR baseline (``composed`` = ``sum``)."""

    name = "clip"

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        from cirkit.backbones._openclip import create_clip, decode_size, embed_dim
        from cirkit.device import pick_device, pick_dtype, resolve_precision

        if spec.model is None:
            spec = self.spec = dataclasses.replace(spec, model=DEFAULT_MODEL,
                                                   pretrained=spec.pretrained or DEFAULT_PRETRAINED)
        if spec.pretrained is None and not spec.model.startswith(("cirkit-", "hf-hub:", "local-dir:")):
            log.warning("%s with random weights (no --pretrained): scores are meaningless", spec.model)
        self.device = pick_device(spec.device)
        precision = resolve_precision(spec.precision, self.device)  # fp32/bf16/fp16: open_clip's names too
        self.dtype = pick_dtype(precision, self.device)
        self.model, self.preprocess, self.tokenizer = create_clip(
            spec.model, spec.pretrained, device=str(self.device), precision=precision, allow_pickle=spec.allow_pickle
        )
        self.model.eval()
        self.dim = embed_dim(self.model)
        self.decode_size = decode_size(self.model)

    def image_transform(self):
        return self.preprocess

    @torch.inference_mode()
    def embed_images(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, dtype=self.dtype, non_blocking=True)
        return normalize(self.model.encode_image(x)).float().cpu()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer([t or "" for t in texts]).to(self.device)
        return normalize(self.model.encode_text(tokens)).float().cpu()

    def embed_composed(self, batch: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Plain CLIP has no fusion: the composed query is the normalised image + text sum."""
        return normalize(self.embed_images(batch) + self.embed_texts(texts))

    def manifest(self) -> EmbeddingManifest:
        m = super().manifest()
        m.extra["precision"] = str(self.dtype).replace("torch.", "")
        return m
