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


