"""The vit backbone: identity at init, cross-attention placement, padding mask, checkpoint round trip."""

import json

import pytest
import torch

from cirkit.backbones import load_backbone
from cirkit.backbones.base import BackboneSpec
from cirkit.backbones.vit import build_model, save_checkpoint

SETTINGS = {"model": "cirkit-tiny", "cross_attn": True, "cross_attn_layers": None, "predictor_hidden": None}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, preprocess, tokenizer = build_model(SETTINGS)
    return model.eval(), preprocess, tokenizer


@pytest.fixture(scope="module")
def tiny_gated():
    """The tanh-gated option (gate_init 0): starts as the CLIP it was built from."""
    torch.manual_seed(0)
    model, preprocess, tokenizer = build_model({**SETTINGS, "gate_init": 0.0})
    return model.eval(), preprocess, tokenizer


def _images(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_the_paper_form_cross_attends_from_the_start_and_without_it_the_model_is_plain_clip(tiny):
    """§II-B/§IV-A: a plain Xavier-initialised residual branch, no gate: text changes the query at init."""
    model, _, tok = tiny
    assert all(xa.gate is None for xa in model.xattn.values()) and model.settings["gate_init"] is None
    x = _images()
    with torch.no_grad():
        plain = torch.nn.functional.normalize(model.clip.encode_image(x), dim=-1)
        red = model.query(x, tok(["make it red"] * 3))
        blue = model.query(x, tok(["make it blue"] * 3))
    assert not torch.allclose(red, blue, atol=1e-4)
    bare, _, _ = build_model({**SETTINGS, "cross_attn": False})  # a stage-1 model: a plain CLIP
    bare.eval()
    with torch.no_grad():
        bare_plain = torch.nn.functional.normalize(bare.clip.encode_image(x), dim=-1)
        assert torch.allclose(torch.nn.functional.normalize(bare.target(x), dim=-1), bare_plain, atol=1e-5)
        assert torch.allclose(torch.nn.functional.normalize(bare.query(x, tok(["a", "b", ""])), dim=-1), bare_plain,
                              atol=1e-5)
    assert plain.shape == bare_plain.shape


def test_a_fresh_model_is_plain_clip(tiny_gated):
    model, _, tok = tiny_gated
    x = _images()
    with torch.no_grad():
        plain = torch.nn.functional.normalize(model.clip.encode_image(x), dim=-1)
        target = torch.nn.functional.normalize(model.target(x), dim=-1)
        query = torch.nn.functional.normalize(model.query(x, tok(["make it red", "add a star", ""])), dim=-1)
    assert torch.allclose(target, plain, atol=1e-5)
    assert torch.allclose(query, plain, atol=1e-5)  # zero gates + zero-init predictor output


def test_every_block_gets_cross_attention_by_default_and_layers_are_configurable(tiny):
    model, _, _ = tiny
    assert sorted(model.xattn) == ["0", "1"]
    m, _, _ = build_model({**SETTINGS, "cross_attn_layers": [-1]})
    assert list(m.xattn) == ["1"] and m.settings["cross_attn_layers"] == [1]
    m, _, _ = build_model({**SETTINGS, "cross_attn": False})
    assert len(m.xattn) == 0
    xa = model.xattn["0"]
    assert xa.attn.num_heads == model.clip.visual.transformer.resblocks[0].attn.num_heads
    with pytest.raises(Exception, match="out of range"):
        build_model({**SETTINGS, "cross_attn_layers": [5]})


@pytest.mark.slow
def test_text_changes_the_query_once_gates_open_and_padding_is_masked(tiny_gated):
    model, _, tok = tiny_gated
    m = __import__("copy").deepcopy(model)
    with torch.no_grad():
        for xa in m.xattn.values():
            xa.gate.fill_(1.0)
        torch.nn.init.normal_(m.predictor.fc2.weight, std=0.1)
    x = _images(2)
    with torch.no_grad():
        red = m.query(x, tok(["make it red", "make it red"]))
        blue = m.query(x, tok(["make it blue", "make it blue"]))
        # the same short text alone or batched with a long one: padding keys must not matter
        alone = m.query(x[:1], tok(["make it red"]))
        batched = m.query(x, tok(["make it red", "a long instruction " * 5]))
    assert not torch.allclose(red, blue)
    assert torch.allclose(alone[0], batched[0], atol=1e-5)


def test_checkpoint_round_trip_with_ema(tiny, tmp_path):
    model, _, tok = tiny
    ema = __import__("copy").deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    save_checkpoint(model, tmp_path, ema=ema, stage="2")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["backbone"] == "vit" and cfg["cirkit"] and cfg["model"] == "cirkit-tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    b = load_backbone(BackboneSpec(model=str(tmp_path)))
    x = _images()
    with torch.no_grad():
        want_gallery = torch.nn.functional.normalize(ema.target(x), dim=-1)
        want_query = torch.nn.functional.normalize(model.query(x, tok(["a", "b", "c"])), dim=-1)
    assert torch.allclose(b.embed_images(x), want_gallery, atol=1e-5)  # gallery = EMA target encoder
    assert torch.allclose(b.embed_composed(x, ["a", "b", "c"]), want_query, atol=1e-5)
    assert b.manifest().dim == 32 and b.manifest().checkpoint.endswith(cfg["weights_id"])


@pytest.mark.parametrize("mode", ["composed", "image", "text", "sum"])
def test_query_modes_are_normalised(tiny, tmp_path, mode):
    model, _, _ = tiny
    save_checkpoint(model, tmp_path)
    b = load_backbone(BackboneSpec(model=str(tmp_path), mode=mode))
    v = b.embed_queries(_images(2), ["make it red", "remove the star"])
    assert v.shape == (2, 32) and v.dtype == torch.float32
    assert torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-5)


def test_wrong_family_and_incomplete_folders_are_user_errors(tiny, tmp_path):
    from cirkit.errors import CheckpointError

    model, _, _ = tiny
    save_checkpoint(model, tmp_path)
    with pytest.raises(CheckpointError, match="vit checkpoint"):
        load_backbone(BackboneSpec(backbone="mllm", model=str(tmp_path)))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_backbone(BackboneSpec(model=str(tmp_path)))
