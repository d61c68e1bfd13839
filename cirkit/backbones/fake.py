"""A deterministic keyword backbone for tests that assert exact ranks.

Images embed as their mean colour (dims 0-2) plus a small hash of their 8x8 thumbnail
(so distinct images differ); texts embed colour words as the same RGB directions and
other words as hashed one-hots. A composed query replaces the image's colour with the
colour named in the text, so "make it red" on a blue square ranks the red square first.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from cirkit.backbones.base import Backbone, BackboneSpec, normalize

COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "purple": (0.5, 0.0, 0.5), "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "orange": (1.0, 0.5, 0.0),
    "grey": (0.5, 0.5, 0.5), "gray": (0.5, 0.5, 0.5), "pink": (1.0, 0.75, 0.8),
}
DIM = 32
THUMB_WEIGHT = 0.05
WORD_WEIGHT = 0.2


def fake_transform(image) -> torch.Tensor:
    """PIL image -> (3, 8, 8) float tensor in [0, 1] (picklable)."""
    arr = np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _projection() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(192, DIM - 3, generator=g) / 192**0.5


class FakeBackbone(Backbone):
    """Deterministic, dependency-free, instant: see module docstring."""

    name = "fake"
    dim = DIM

    def __init__(self, spec: BackboneSpec | None = None):
        super().__init__(spec or BackboneSpec(backbone="fake", model="fake"))
        self._proj = _projection()

    def image_transform(self):
        return fake_transform

    def _image_vecs(self, batch: torch.Tensor) -> torch.Tensor:
        mean = batch.mean(dim=(2, 3))
        rest = THUMB_WEIGHT * torch.tanh(batch.flatten(1) @ self._proj)
        return torch.cat([mean, rest], dim=1)

    def embed_images(self, batch):
        return normalize(self._image_vecs(batch))

    @staticmethod
    def _words(text: str) -> list[str]:
        return [w.strip(".,!?;:'\"").lower() for w in (text or "").split() if w.strip(".,!?;:'\"")]

    def _text_vec(self, text: str) -> tuple[torch.Tensor, bool]:
        v = torch.zeros(DIM)
        has_colour = False
        for w in self._words(text):
            if w in COLOURS:
                v[:3] += torch.tensor(COLOURS[w])
                has_colour = True
            else:
                v[3 + zlib.crc32(w.encode()) % (DIM - 3)] += WORD_WEIGHT
        return v, has_colour

    def embed_texts(self, texts):
        return normalize(torch.stack([self._text_vec(t)[0] for t in texts]))

    def embed_composed(self, batch, texts):
        img = self._image_vecs(batch)
        out = []
        for i, t in enumerate(texts):
            tv, has_colour = self._text_vec(t)
            v = img[i].clone()
            if has_colour:
                v[:3] = tv[:3]
            v[3:] += tv[3:] * 0.1
            out.append(v)
        return normalize(torch.stack(out))

    def checkpoint_id(self) -> str:
        return "fake"
