"""The mllm backbone on a tiny LLaVA built in-process (saved and reloaded via from_pretrained)."""

from __future__ import annotations

import json
import sys
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
from cirkit.errors import CheckpointError, CirkitError  # noqa: E402
from cirkit.train.mllm import MllmTrainPlugin  # noqa: E402
from cirkit.train.plugin import TrainConfig  # noqa: E402

COLOURS = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 200, 30), "yellow": (240, 230, 40)}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    from cirkit.backbones.mllm_demo import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("mllm") / "tiny-llava")


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    from PIL import Image, ImageDraw

    d = tmp_path_factory.mktemp("mllm-data")
    (d / "img").mkdir()
    caps, trips = [], []
    for name, rgb in COLOURS.items():
        im = Image.new("RGB", (40, 32), (128, 128, 128))
        ImageDraw.Draw(im).ellipse((8, 6, 30, 28), fill=rgb)
        im.save(d / "img" / f"{name}.png")
        caps.append({"id": name, "image": f"img/{name}.png", "caption": f"a {name} circle"})
    for a in COLOURS:
        for b in COLOURS:
            if a != b:
                trips.append({"id": f"{a}-{b}", "reference": f"img/{a}.png", "instruction": f"make it {b}",
                              "target": f"img/{b}.png", "target_caption": f"a {b} circle"})
    (d / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in caps))
    (d / "triplets.jsonl").write_text("".join(json.dumps(x) + "\n" for x in trips))
    return d


def _images(data: Path):
    from cirkit.io import open_image

    return [open_image(data / "img" / f"{n}.png") for n in COLOURS]


def _train(plugin: MllmTrainPlugin, steps: int = 3, lr: float = 5e-3):
    """A minimal forward/backward loop over the plugin contract (what the generic loop does)."""
    torch.manual_seed(0)
    model = plugin.build()
    ds, collate = plugin.dataset()
    opt = torch.optim.AdamW(plugin.parameters(model), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        idx = [(step * 4 + i) % len(ds) for i in range(min(6, len(ds)))]
        loss, logs = plugin.loss(model, collate([ds[i] for i in idx]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        assert {"acc", "temperature"} <= set(logs)
    model.eval()
    return model, losses


def _cfg(tiny: Path, data: Path, out: Path, stage: str = "1", **kw) -> TrainConfig:
    file = "captions.jsonl" if stage == "1" else "triplets.jsonl"
    return TrainConfig(backbone="mllm", stage=stage, data=data / file, model=str(tiny), output=out,
                       lora_r=4, lora_alpha=8, lora_dropout=0.0, **kw)


# -- embeddings ----------------------------------------------------------------------------
@pytest.mark.slow
def test_embeddings_are_normalised_and_independent_of_the_batch(tiny, data):
    bb = load_backbone(BackboneSpec(backbone="mllm", model=str(tiny)))
    assert isinstance(bb, MllmBackbone) and bb.dim == 32
    ims = _images(data)
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
    assert bb.manifest()["templates"]["image"] == DEFAULT_TEMPLATES["image"]


def test_text_only_bypasses_the_vision_encoder_and_projector(tiny, monkeypatch):
    bb = load_mllm_backbone(BackboneSpec(model=str(tiny)))
    inner = bb.model.model

    def boom(*a, **k):
        raise AssertionError("vision side called for a text-only input")

    monkeypatch.setattr(inner.vision_tower, "forward", boom)
    monkeypatch.setattr(inner.multi_modal_projector, "forward", boom)
    assert bb.embed_texts(["a red circle"]).shape == (1, 32)
    assert bb.embed_queries(None, ["make it red"]).shape == (1, 32)


def test_prompts_end_with_the_end_token_and_the_last_token_is_read(tiny):
    from transformers import AutoProcessor

    p = Prompter(AutoProcessor.from_pretrained(tiny))
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


# -- training ------------------------------------------------------------------------------
def test_lora_targets_only_the_llm_and_the_vision_tower_stays_frozen(tiny, data, tmp_path):
    plugin = MllmTrainPlugin(_cfg(tiny, data, tmp_path / "m"))
    model = plugin.build()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n == "logit_scale" for n in trainable)
    assert all("language_model" in n for n in trainable if "lora_" in n)
    assert any(".q_proj." in n for n in trainable) and any(".down_proj." in n for n in trainable)
    # Unfrozen vision: the tower and projector train fully (saved as peft modules_to_save).
    plugin = MllmTrainPlugin(_cfg(tiny, data, tmp_path / "m", freeze_vision=False, lora_target_modules=["q_proj"]))
    names = [n for n, p in plugin.build().named_parameters() if p.requires_grad]
    assert any("vision_tower" in n for n in names) and any("multi_modal_projector" in n for n in names)
    assert not any("k_proj.lora" in n for n in names)


@pytest.mark.slow
def test_stage1_then_stage2_adapters_save_reload_and_merge_identically(tiny, data, tmp_path):
    s1 = tmp_path / "stage1"
    plugin = MllmTrainPlugin(_cfg(tiny, data, s1, freeze_vision=False, gradient_checkpointing=True))
    model, losses = _train(plugin)
    assert all(map(lambda x: x == x, losses))
    plugin.save(model, s1)
    assert {"config.json", "adapter_config.json", "adapter_model.safetensors", "train_args.json"} <= {
        p.name for p in s1.iterdir()}
    s2 = tmp_path / "stage2"
    plugin2 = MllmTrainPlugin(_cfg(tiny, data, s2, stage="2", init=str(s1), merge=True, target_image_loss=True))
    model2, _ = _train(plugin2)
    plugin2.save(model2, s2)
    cfg = json.loads((s2 / "config.json").read_text())
    assert cfg["backbone"] == "mllm" and cfg["base_model"] == str(tiny.resolve())
    assert cfg["templates"] == DEFAULT_TEMPLATES and cfg["merged"] is True
    assert (s2 / "model.safetensors").exists()

    ims, texts = _images(data), ["make it red", "make it blue", "make it green", "make it yellow"]
    # In memory (training wrapper) vs reloaded adapter vs merged weights without peft.
    live = MllmBackbone(BackboneSpec(model=str(s2)), model2.model, plugin2.processor)
    adapter = load_mllm_backbone(BackboneSpec(model=str(s2)), prefer="adapter")
    saved_peft = sys.modules.get("peft")
    sys.modules["peft"] = None  # merged weights must load without peft
    try:
        merged = load_backbone(BackboneSpec(model=str(s2)))
    finally:
        sys.modules["peft"] = saved_peft
    for other in (adapter, merged):
        for a, b in ((live.embed_images(ims), other.embed_images(ims)),
                     (live.embed_texts(texts), other.embed_texts(texts)),
                     (live.embed_composed(ims, texts), other.embed_composed(ims, texts))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Stage 2 really changed the model relative to stage 1.
    st1 = load_mllm_backbone(BackboneSpec(model=str(s1)))
    assert not torch.allclose(st1.embed_composed(ims, texts), adapter.embed_composed(ims, texts), atol=1e-4)


def test_full_finetune_writes_complete_weights(tiny, data, tmp_path):
    out = tmp_path / "full"
    plugin = MllmTrainPlugin(_cfg(tiny, data, out, full_finetune=True))
    model, _ = _train(plugin, steps=2)
    assert any("language_model" in n and p.requires_grad for n, p in model.named_parameters())
    assert not any("vision_tower" in n and p.requires_grad for n, p in model.named_parameters())
    plugin.save(model, out)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    bb = load_backbone(BackboneSpec(model=str(out)))
    live = MllmBackbone(BackboneSpec(model=str(out)), model.model, plugin.processor)
    torch.testing.assert_close(bb.embed_texts(["a red circle"]), live.embed_texts(["a red circle"]), atol=1e-5, rtol=0)


def test_custom_templates_are_used_and_recorded(tiny, data, tmp_path):
    templates = {"text": "Caption: <sent>\nOne word:", "end": ""}
    out = tmp_path / "tpl"
    plugin = MllmTrainPlugin(_cfg(tiny, data, out, extra={"templates": templates}))
    model, _ = _train(plugin, steps=1)
    plugin.save(model, out)
    bb = load_mllm_backbone(BackboneSpec(model=str(out)))
    assert bb.prompter.fill("text", "x") == "Caption: x\nOne word:"
    assert json.loads((out / "config.json").read_text())["templates"]["end"] == ""


def test_errors_are_one_line_and_say_what_to_do(tiny, data, tmp_path):
    with pytest.raises(CirkitError, match="use 1 or 2"):
        MllmTrainPlugin(_cfg(tiny, data, tmp_path / "x", stage="combiner"))
    with pytest.raises(CheckpointError, match="not a cirkit mllm checkpoint"):
        MllmTrainPlugin(_cfg(tiny, data, tmp_path / "x", init=str(tiny))).build()
    with pytest.raises(CirkitError, match="none of the LoRA target modules"):
        MllmTrainPlugin(_cfg(tiny, data, tmp_path / "x", lora_target_modules=["nope"])).build()
    with pytest.raises(CirkitError, match="cannot load multimodal model"):
        load_mllm_backbone(BackboneSpec(model=str(tmp_path / "missing")))
    with pytest.raises(CirkitError, match="no training data: pass DATA"):
        MllmTrainPlugin(TrainConfig(backbone="mllm", stage="1", model=str(tiny))).dataset()


def test_encode_pipeline_runs_the_backbone_through_dataloader_workers(tiny, data):
    from cirkit.encode import encode_images, encode_queries

    bb = load_mllm_backbone(BackboneSpec(model=str(tiny)))
    items = [(n, data / "img" / f"{n}.png") for n in COLOURS] + [("broken", data / "nope.png")]
    enc = encode_images(bb, items, batch_size=3, num_workers=1)
    assert enc.ids == list(COLOURS) and enc.failed[0][0] == "broken"
    torch.testing.assert_close(enc.vectors, bb.embed_images(_images(data)), atol=1e-5, rtol=0)
    q = encode_queries(bb, [("q1", data / "img" / "red.png", "make it blue"), ("q2", None, "a blue circle")],
                       batch_size=2, num_workers=0)
    assert q.ids == ["q1", "q2"] and q.vectors.shape == (2, 32)


@pytest.mark.slow
def test_the_generic_training_loop_runs_the_plugin_unchanged(tiny, data, tmp_path):
    from cirkit.train import run

    common = dict(backbone="mllm", model=str(tiny), batch_size=4, max_steps=2, warmup_steps=0, num_workers=0,
                  lora_r=4, lora_alpha=8, log_every=1, save_every=0, precision="fp32")
    r1 = run(TrainConfig(stage="1", data=data / "captions.jsonl", output=tmp_path / "s1", **common))
    assert r1.counts["steps"] == 2
    r2 = run(TrainConfig(stage="2", data=data / "triplets.jsonl", output=tmp_path / "s2", init=str(tmp_path / "s1"),
                         merge=True, **common))
    assert r2.counts["steps"] == 2
    files = {p.name for p in (tmp_path / "s2").iterdir()}
    assert {"config.json", "train_args.json", "adapter_config.json", "adapter_model.safetensors",
            "model.safetensors", "metrics.jsonl", "trainer_state"} <= files
    bb = load_backbone(BackboneSpec(model=str(tmp_path / "s2")))
    assert isinstance(bb, MllmBackbone) and bb.embed_texts(["a red circle"]).shape == (1, 32)
