"""The fake backbone is deterministic and its composed queries follow colour words."""

import torch
from PIL import Image

from cirkit.backbones import load_backbone
from cirkit.backbones.base import BackboneSpec
from cirkit.backbones.fake import fake_transform


def _batch(*colours):
    return torch.stack([fake_transform(Image.new("RGB", (16, 16), c)) for c in colours])


def test_deterministic_and_normalised():
    b = load_backbone(BackboneSpec(backbone="fake"))
    x = _batch("red", "blue")
    v1, v2 = b.embed_images(x), load_backbone(BackboneSpec(backbone="fake")).embed_images(x)
    assert torch.equal(v1, v2)
    assert torch.allclose(v1.norm(dim=1), torch.ones(2))


def test_composed_query_moves_to_the_named_colour():
    b = load_backbone(BackboneSpec(backbone="fake"))
    gallery = b.embed_images(_batch("red", "blue", "green"))
    q = b.embed_queries(_batch("blue"), ["make it red"])
    assert int((q @ gallery.T).argmax()) == 0
    # image-only mode ignores the text: the blue reference itself wins
    img_only = load_backbone(BackboneSpec(backbone="fake", mode="image"))
    q2 = img_only.embed_queries(_batch("blue"), ["make it red"])
    assert int((q2 @ gallery.T).argmax()) == 1


def test_text_only_query():
    b = load_backbone(BackboneSpec(backbone="fake"))
    gallery = b.embed_images(_batch("red", "blue", "green"))
    q = b.embed_queries(None, ["a green thing"])
    assert int((q @ gallery.T).argmax()) == 2
