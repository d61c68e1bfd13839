"""Training the mllm backbone: the plugin on its own, its checkpoints, the generic loop (its recipes: tests/test_recipes.py).

Moved from tests/backbones/test_mllm.py (issue 13: training tests live under tests/train/). The
tiny LLaVA and the coloured-circle data are session fixtures of tests/conftest.py.
"""

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
from cirkit.backbones.mllm import DEFAULT_TEMPLATES, MllmBackbone, load_mllm_backbone  # noqa: E402
from cirkit.errors import CheckpointError, CirkitError  # noqa: E402
from cirkit.train.mllm import MllmTrainPlugin  # noqa: E402
from cirkit.train.plugin import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COLOURS = ("red", "blue", "green", "yellow")  # the images of the mllm_data fixture


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


# -- training ------------------------------------------------------------------------------
def test_lora_targets_only_the_llm_and_the_vision_tower_stays_frozen(tiny_llava, mllm_data, tmp_path):
    plugin = MllmTrainPlugin(_cfg(tiny_llava, mllm_data, tmp_path / "m"))
    model = plugin.build()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n == "logit_scale" for n in trainable)
    assert all("language_model" in n for n in trainable if "lora_" in n)
    assert any(".q_proj." in n for n in trainable) and any(".down_proj." in n for n in trainable)
    # Unfrozen vision: the tower and projector train fully (saved as peft modules_to_save).
    plugin = MllmTrainPlugin(_cfg(tiny_llava, mllm_data, tmp_path / "m", freeze_vision=False, lora_target_modules=["q_proj"]))
    names = [n for n, p in plugin.build().named_parameters() if p.requires_grad]
    assert any("vision_tower" in n for n in names) and any("multi_modal_projector" in n for n in names)
    assert not any("k_proj.lora" in n for n in names)


def test_stage1_then_stage2_adapters_save_reload_and_merge_identically(tiny_llava, mllm_data, tmp_path):
    s1 = tmp_path / "stage1"
    plugin = MllmTrainPlugin(_cfg(tiny_llava, mllm_data, s1, freeze_vision=False, gradient_checkpointing=True))
    model, losses = _train(plugin)
    assert all(map(lambda x: x == x, losses))
    plugin.save(model, s1)
    # train_args.json is the loop's (test_the_generic_training_loop_runs_the_plugin_unchanged)
    assert {"config.json", "adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in s1.iterdir()}
    s2 = tmp_path / "stage2"
    plugin2 = MllmTrainPlugin(_cfg(tiny_llava, mllm_data, s2, stage="2", init=str(s1), merge=True, target_image_loss=True))
    model2, _ = _train(plugin2)
    plugin2.save(model2, s2)
    # issue 14: a merged folder is a transformers model folder, so cirkit's config is cirkit.json
    # (was config.json); config.json is the model's own (tests/train/test_model_folders.py loads it)
    cfg = json.loads((s2 / "cirkit.json").read_text())
    assert json.loads((s2 / "config.json").read_text())["model_type"] == "llava"
    assert cfg["backbone"] == "mllm" and cfg["base_model"] == str(tiny_llava.resolve())
    assert cfg["templates"] == DEFAULT_TEMPLATES and cfg["merged"] is True
    assert (s2 / "model.safetensors").exists()

    ims, texts = _images(mllm_data), ["make it red", "make it blue", "make it green", "make it yellow"]
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


def test_full_finetune_writes_complete_weights(tiny_llava, mllm_data, tmp_path):
    out = tmp_path / "full"
    plugin = MllmTrainPlugin(_cfg(tiny_llava, mllm_data, out, full_finetune=True))
    model, _ = _train(plugin, steps=2)
    assert any("language_model" in n and p.requires_grad for n, p in model.named_parameters())
    assert not any("vision_tower" in n and p.requires_grad for n, p in model.named_parameters())
    plugin.save(model, out)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    bb = load_backbone(BackboneSpec(model=str(out)))
    live = MllmBackbone(BackboneSpec(model=str(out)), model.model, plugin.processor)
    torch.testing.assert_close(bb.embed_texts(["a red circle"]), live.embed_texts(["a red circle"]), atol=1e-5, rtol=0)


def test_custom_templates_are_used_and_recorded(tiny_llava, mllm_data, tmp_path):
    templates = {"text": "Caption: <sent>\nOne word:", "end": ""}
    out = tmp_path / "tpl"
    plugin = MllmTrainPlugin(_cfg(tiny_llava, mllm_data, out, templates=templates))
    model, _ = _train(plugin, steps=1)
    plugin.save(model, out)
    bb = load_mllm_backbone(BackboneSpec(model=str(out)))
    assert bb.prompter.fill("text", "x") == "Caption: x\nOne word:"
    assert json.loads((out / "config.json").read_text())["templates"]["end"] == ""


def test_errors_are_one_line_and_say_what_to_do(tiny_llava, mllm_data, tmp_path):
    with pytest.raises(CirkitError, match="use 1 or 2"):
        MllmTrainPlugin(_cfg(tiny_llava, mllm_data, tmp_path / "x", stage="combiner"))
    with pytest.raises(CheckpointError, match="not a cirkit mllm checkpoint"):
        MllmTrainPlugin(_cfg(tiny_llava, mllm_data, tmp_path / "x", init=str(tiny_llava))).build()
    with pytest.raises(CirkitError, match="none of the LoRA target modules"):
        MllmTrainPlugin(_cfg(tiny_llava, mllm_data, tmp_path / "x", lora_target_modules=["nope"])).build()
    with pytest.raises(CirkitError, match="cannot load multimodal model"):
        load_mllm_backbone(BackboneSpec(model=str(tmp_path / "missing")))
    with pytest.raises(CirkitError, match="no training data: pass DATA"):
        MllmTrainPlugin(TrainConfig(backbone="mllm", stage="1", model=str(tiny_llava))).dataset()


def test_unreadable_images_are_reported_by_the_collate_not_raised(tiny_llava, mllm_data, tmp_path):
    import shutil

    d = Path(shutil.copytree(mllm_data, tmp_path / "d"))
    (d / "img" / "red.png").write_bytes(b"not a png")
    ds, collate = MllmTrainPlugin(_cfg(tiny_llava, d, tmp_path / "x")).dataset()
    batch = collate([ds[i] for i in range(len(ds))])  # red, blue, green, yellow
    assert batch["examples"] == 3 and [s[0] for s in batch["skipped"]] == [str(d / "img" / "red.png")]
    assert {"query", "caption", "same"} <= set(batch)
    too_few = collate([ds[0], ds[1]])  # one readable example: no batch, and no exception in a worker
    assert set(too_few) == {"skipped", "examples"} and too_few["examples"] == 1


def test_the_generic_training_loop_runs_the_plugin_unchanged(tiny_llava, mllm_data, tmp_path):
    from cirkit.train import run

    common = dict(backbone="mllm", model=str(tiny_llava), batch_size=4, max_steps=2, warmup_steps=0, num_workers=0,
                  lora_r=4, lora_alpha=8, log_every=1, save_every=0, precision="fp32")
    r1 = run(TrainConfig(stage="1", data=mllm_data / "captions.jsonl", output=tmp_path / "s1", **common))
    assert r1.counts["steps"] == 2
    r2 = run(TrainConfig(stage="2", data=mllm_data / "triplets.jsonl", output=tmp_path / "s2", init=str(tmp_path / "s1"),
                         merge=True, **common))
    assert r2.counts["steps"] == 2
    files = {p.name for p in (tmp_path / "s2").iterdir()}
    # issue 14: a merged folder is a transformers model folder (config.json the model's, cirkit's in
    # cirkit.json) and keeps its adapter in adapter/ (was: adapter files beside model.safetensors)
    assert {"config.json", "cirkit.json", "train_args.json", "model.safetensors", "metrics.jsonl",
            "trainer_state"} <= files
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "s2" / "adapter").iterdir()}
    bb = load_backbone(BackboneSpec(model=str(tmp_path / "s2")))
    assert isinstance(bb, MllmBackbone) and bb.embed_texts(["a red circle"]).shape == (1, 32)


def test_train_vision_leaves_what_llava_15_never_reads_frozen(tmp_path, mllm_data):
    """vision_feature_layer -2 (LLaVA-1.5): the tower's last block and post-layernorm get no gradient,
    so --train-vision does not train them (DDP could not reduce them; see test_distributed.py)."""
    from cirkit.testing import build_tiny_llava
    from cirkit.train.mllm import unused_vision_parameters

    model_dir = build_tiny_llava(tmp_path / "llava15", vision_feature_layer=-2, layers=3)
    for full in (False, True):
        plugin = MllmTrainPlugin(_cfg(model_dir, mllm_data, tmp_path / "o", freeze_vision=False, full_finetune=full))
        model = plugin.build()
        unused = unused_vision_parameters(model.model)
        assert unused and all(".layers.2." in n or "post_layernorm" in n for n in unused)
        assert any(".layers.2." in n for n in unused) and not any(".layers.1." in n for n in unused)
        ds, collate = plugin.dataset()
        batch = collate([ds[i] for i in range(len(ds))])
        batch.pop("skipped"), batch.pop("examples")
        loss, _ = plugin.loss(model, batch)
        loss.backward()
        # every trained parameter takes part in the loss: nothing DDP would wait for in vain
        idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert idle == []
        assert any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """Tiny models with the layouts the mllm recipes name: LLaVA-1.5 (vision_feature_layer -2) and Qwen2-VL."""
    from cirkit.testing import build_tiny_llava, build_tiny_qwen2_vl

    d = tmp_path_factory.mktemp("families")
    return {"llava": build_tiny_llava(d / "llava15", vision_feature_layer=-2, layers=3),
            "qwen2-vl": build_tiny_qwen2_vl(d / "qwen2vl")}


MLLM_RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("mllm-*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", MLLM_RECIPES)
@pytest.mark.parametrize("train_vision", [False, True])
def test_every_mllm_recipe_trains_a_step_on_its_family_at_test_size(family_models, mllm_data, tmp_path, recipe,
                                                                     train_vision):
    """The recipe's settings as `cirkit train -c` resolves them, on a tiny model of the family its hub id
    names; with --train-vision too: every trained parameter takes part in the loss (what DDP needs)."""
    from cirkit.config import resolve

    family = "qwen2-vl" if "qwen" in recipe else "llava"
    stage = "2" if yaml_stage(recipe) == "2" else "1"
    cfg = resolve(TrainConfig, ROOT / "recipes" / recipe,
                  {"model": str(family_models[family]), "output": tmp_path / "o", "num_workers": 0, "batch_size": 4,
                   "data": mllm_data / ("triplets.jsonl" if stage == "2" else "captions.jsonl"), "max_length": 32,
                   "freeze_vision": not train_vision, "init": None}, section="train")
    plugin = MllmTrainPlugin(cfg)
    torch.manual_seed(0)
    model = plugin.build()
    ds, collate = plugin.dataset()
    batch = collate([ds[i] for i in range(4)])
    batch.pop("skipped"), batch.pop("examples")
    model.train()
    loss, logs = plugin.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and {"acc", "temperature"} <= set(logs)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    from cirkit.backbones.mllm import vision_module_names

    vision = [f".{v}." for v in vision_module_names(model.model)]  # LLaVA: vision_tower, projector; Qwen2-VL: visual
    assert any(v in n for n, p in model.named_parameters() if p.requires_grad for v in vision) == train_vision
    if family == "qwen2-vl":  # the recipe's image bound reached the processor
        size = plugin.processor.image_processor.size
        assert (size["shortest_edge"], size["longest_edge"]) == (cfg.min_pixels, cfg.max_pixels) == (12544, 451584)


def yaml_stage(recipe: str) -> str:
    import yaml

    return str(yaml.safe_load((ROOT / "recipes" / recipe).read_text())["train"].get("stage", "2"))
