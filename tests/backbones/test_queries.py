"""The query side every backbone shares (``Backbone.embed_queries``): the per-query text fallback."""

from __future__ import annotations

import pytest
import torch

from cirkit.backbones import load_backbone
from cirkit.backbones.base import BackboneSpec


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """fake, clip (tiny random), vit (a paper-form checkpoint: cross-attention on) by name."""
    from safetensors.torch import save_file

    from cirkit.backbones._openclip import create_clip
    from cirkit.backbones.vit import build_model, save_checkpoint

    d = tmp_path_factory.mktemp("queries")
    torch.manual_seed(0)
    clip, _, _ = create_clip("cirkit-tiny", None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(d / "clip.safetensors"))
    vit, _, _ = build_model({"model": "cirkit-tiny"})
    with torch.no_grad():
        torch.nn.init.normal_(vit.predictor.fc2.weight, std=0.2)  # text reaches the query
    save_checkpoint(vit, d / "vit", stage="2")
    return {
        "fake": BackboneSpec(backbone="fake"),
        "clip": BackboneSpec(backbone="clip", model="cirkit-tiny", pretrained=str(d / "clip.safetensors")),
        "vit": BackboneSpec(model=str(d / "vit")),
    }


def _batch(bb, n=4):
    from PIL import Image

    tf = bb.image_transform()
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)][:n]
    return bb.collate([tf(Image.new("RGB", (40, 32), c)) for c in colours])


@pytest.mark.parametrize("name", ["fake", "clip", "vit"])
@pytest.mark.parametrize("mode", ["composed", "sum"])
def test_a_blank_text_is_image_only_per_query_whatever_the_batch(backbones, name, mode):
    """CIRR test1 has a caption " ": that query must embed the same alone and inside any batch."""
    spec = backbones[name]
    spec.mode = mode
    bb = load_backbone(spec)
    batch = _batch(bb)
    texts = ["make it blue", " ", "add a red star", ""]
    together = bb.embed_queries(batch, texts)
    for i, t in enumerate(texts):
        alone = bb.embed_queries(batch[i : i + 1], [t])
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=0)
    image_only = bb.embed_image_queries(batch)
    for i in (1, 3):
        torch.testing.assert_close(together[i], image_only[i], atol=1e-5, rtol=0)
    if name != "fake":  # the text does change the others (the fake backbone ignores unknown words)
        assert not torch.allclose(together[0], image_only[0], atol=1e-4)


@pytest.mark.slow
def test_a_blank_text_is_image_only_per_query_on_the_mllm(tiny_llava, mllm_data):
    from cirkit.io import open_image

    bb = load_backbone(BackboneSpec(backbone="mllm", model=str(tiny_llava)))
    ims = [open_image(mllm_data / "img" / f"{c}.png") for c in ("red", "blue", "green")]
    together = bb.embed_queries(ims, ["make it blue", "  ", "make it red"])
    torch.testing.assert_close(together[1], bb.embed_images([ims[1]])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together[2], bb.embed_queries([ims[2]], ["make it red"])[0], atol=1e-5, rtol=0)
