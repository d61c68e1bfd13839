"""The mllm backbone on a tiny LLaVA built in-process (saved and reloaded via from_pretrained).

Its training (the plugin, checkpoints, recipes) is tested in tests/train/test_mllm.py; the tiny
model and the data are session fixtures of tests/conftest.py shared by both.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from cirkit.backbones import load_backbone  # noqa: E402
from cirkit.backbones.base import BackboneSpec  # noqa: E402
from cirkit.backbones.mllm import (  # noqa: E402
    DEFAULT_TEMPLATES,
    MllmBackbone,
    Prompter,
    last_token_hidden,
    load_mllm_backbone,
)
from cirkit.errors import CirkitError  # noqa: E402

COLOURS = ("red", "blue", "green", "yellow")  # the images of the mllm_data fixture


def _images(mllm_data: Path):
    from cirkit.io import open_image

    return [open_image(mllm_data / "img" / f"{n}.png") for n in COLOURS]


# -- embeddings ----------------------------------------------------------------------------
@pytest.mark.slow
def test_embeddings_are_normalised_and_independent_of_the_batch(tiny_llava, mllm_data):
    bb = load_backbone(BackboneSpec(backbone="mllm", model=str(tiny_llava)))
    assert isinstance(bb, MllmBackbone) and bb.dim == 32
    ims = _images(mllm_data)
    full = bb.embed_images(ims)
    assert full.shape == (4, 32) and full.dtype == torch.float32
    torch.testing.assert_close(full.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(bb.embed_images(ims[2:3])[0], full[2], atol=1e-5, rtol=0)
    texts = ["a red circle", "a much longer caption about a yellow circle on grey"]
    both = bb.embed_texts(texts)
    torch.testing.assert_close(bb.embed_texts(texts[:1])[0], both[0], atol=1e-5, rtol=0)
    comp = bb.embed_composed(ims[:2], ["make it blue", "make it green and much bigger please"])
    torch.testing.assert_close(bb.embed_composed(ims[:1], ["make it blue"])[0], comp[0], atol=1e-5, rtol=0)
    assert not torch.allclose(comp[0], full[0])  # the instruction changes the embedding
    assert bb.manifest().extra["templates"]["image"] == DEFAULT_TEMPLATES["image"]


def test_text_only_bypasses_the_vision_encoder_and_projector(tiny_llava, monkeypatch):
    bb = load_mllm_backbone(BackboneSpec(model=str(tiny_llava)))
    inner = bb.model.model

    def boom(*a, **k):
        raise AssertionError("vision side called for a text-only input")

    monkeypatch.setattr(inner.vision_tower, "forward", boom)
    monkeypatch.setattr(inner.multi_modal_projector, "forward", boom)
    assert bb.embed_texts(["a red circle"]).shape == (1, 32)
    assert bb.embed_queries(None, ["make it red"]).shape == (1, 32)


def test_prompts_end_with_the_end_token_and_the_last_token_is_read(tiny_llava):
    from transformers import AutoProcessor

    p = Prompter(AutoProcessor.from_pretrained(tiny_llava))
    assert p.fill("text", "a red circle") == "a red circle\nSummarize above sentence in one word:</s>"
    assert p.fill("composed", "make it blue").startswith("<image>\nModify this image with \"make it blue\"")
    enc = p.texts(["ab", "abcd"])
    mask = enc["attention_mask"]
    assert mask[0, -1] == 0 and mask[1].all()  # right-padded
    for row in range(2):  # the end token is each row's last attended token
        assert enc["input_ids"][row, int(mask[row].sum()) - 1] == p.tokenizer.eos_token_id
    h = torch.arange(2 * 5 * 1.0).view(2, 5, 1)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert last_token_hidden(h, left).flatten().tolist() == [4.0, 9.0]
    assert last_token_hidden(h, right).flatten().tolist() == [2.0, 9.0]
    with pytest.raises(CirkitError, match="must contain <instruction>"):
        Prompter(p.processor, {"composed": "<image> edit it"})


def test_encode_pipeline_runs_the_backbone_through_dataloader_workers(tiny_llava, mllm_data):
    from cirkit.encode import encode_images, encode_queries

    bb = load_mllm_backbone(BackboneSpec(model=str(tiny_llava)))
    items = [(n, mllm_data / "img" / f"{n}.png") for n in COLOURS] + [("broken", mllm_data / "nope.png")]
    enc = encode_images(bb, items, batch_size=3, num_workers=1)
    assert enc.ids == list(COLOURS) and enc.failed[0][0] == "broken"
    torch.testing.assert_close(enc.vectors, bb.embed_images(_images(mllm_data)), atol=1e-5, rtol=0)
    q = encode_queries(bb, [("q1", mllm_data / "img" / "red.png", "make it blue"), ("q2", None, "a blue circle")],
                       batch_size=2, num_workers=0)
    assert q.ids == ["q1", "q2"] and q.vectors.shape == (2, 32)




# -- dynamic-resolution images (Qwen2-VL) are bounded (issue 15.7) ------------------------------
@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from cirkit.testing import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen2-vl")


def _visual_tokens(bb, image) -> int:
    enc = bb.prompter.images([image])
    return int((enc["input_ids"] == bb.prompter.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


@pytest.mark.slow
def test_qwen2_vl_images_are_capped_at_max_pixels(tiny_qwen, tmp_path):
    """A 4000x3000 photo is 1,230 visual tokens at the processor's own bound (16k at the hub configs');
    cirkit's default caps it at max_pixels = 576 x 28 x 28, i.e. 576 tokens, and training records the cap."""
    from PIL import Image
    from transformers import AutoProcessor, Qwen2VLConfig

    from cirkit.backbones.mllm import default_pixels

    assert Qwen2VLConfig().vision_config.spatial_merge_size == 2  # the real layout: one token per 28x28 px
    photo = Image.new("RGB", (4000, 3000), (120, 30, 200))
    raw = load_mllm_backbone(BackboneSpec(model=str(tiny_qwen)))
    assert default_pixels() == (16 * 28 * 28, 576 * 28 * 28)
    assert 0 < _visual_tokens(raw, photo) <= 576
    assert _visual_tokens(raw, Image.new("RGB", (8, 8))) >= 16  # min_pixels: tiny images are upsized
    uncapped = AutoProcessor.from_pretrained(tiny_qwen)
    assert _visual_tokens(MllmBackbone(BackboneSpec(model=str(tiny_qwen)), raw.model, uncapped), photo) == 1230
    v = raw.embed_images([photo])
    assert v.shape == (1, 32) and torch.isfinite(v).all()


def test_fixed_size_processors_are_not_touched(tiny_llava):
    from transformers import AutoProcessor

    from cirkit.backbones.mllm import cap_image_pixels

    p = AutoProcessor.from_pretrained(tiny_llava)
    before = dict(p.image_processor.size) if isinstance(p.image_processor.size, dict) else vars(p.image_processor.size)
    assert cap_image_pixels(p, 100, 1000) is False
    after = dict(p.image_processor.size) if isinstance(p.image_processor.size, dict) else vars(p.image_processor.size)
    assert after == before


@pytest.mark.slow
def test_a_qwen2_vl_checkpoint_records_and_reapplies_its_pixel_bounds(tiny_qwen, mllm_data, tmp_path):
    import json

    from cirkit.train.mllm import MllmTrainPlugin
    from cirkit.train.plugin import TrainConfig

    cfg = TrainConfig(backbone="mllm", stage="1", data=mllm_data / "captions.jsonl", model=str(tiny_qwen),
                      output=tmp_path / "q", lora_r=2, lora_alpha=4, lora_dropout=0.0, max_pixels=64 * 28 * 28,
                      max_length=16)
    plugin = MllmTrainPlugin(cfg)
    model = plugin.build()
    ds, collate = plugin.dataset()
    batch = collate([ds[i] for i in range(2)])
    _, enc = batch["query"]
    assert int((enc["input_ids"] == plugin.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) <= 2 * 64
    plugin.save(model, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert (saved["min_pixels"], saved["max_pixels"]) == (16 * 28 * 28, 64 * 28 * 28)
    bb = load_backbone(BackboneSpec(model=str(tmp_path / "q")))
    from PIL import Image

    assert _visual_tokens(bb, Image.new("RGB", (4000, 3000))) <= 64
