"""The open_clip zero-shot baselines, on a tiny random model saved to and loaded from safetensors."""

import json
import pickle

import pytest
import torch
from typer.testing import CliRunner

from cirkit.backbones import load_backbone
from cirkit.backbones.base import BackboneSpec


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """cirkit-tiny with random init, saved as safetensors (nothing downloads)."""
    from safetensors.torch import save_file

    from cirkit.backbones._openclip import create_clip

    torch.manual_seed(0)
    model, _, _ = create_clip("cirkit-tiny", None)
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def clip(tiny_weights):
    return load_backbone(BackboneSpec(backbone="clip", model="cirkit-tiny", pretrained=str(tiny_weights)))


def test_loads_weights_from_the_file(clip, tiny_weights):
    from safetensors.torch import load_file

    saved = load_file(str(tiny_weights))
    name = next(k for k in saved if k.endswith("proj") or "proj" in k)
    assert torch.equal(clip.model.state_dict()[name], saved[name])
    m = clip.manifest()
    assert m.backbone == "clip" and m.dim == clip.dim == 32
    assert m.checkpoint == f"cirkit-tiny@{tiny_weights}"


def test_modes_and_composed_is_sum(clip):
    from PIL import Image

    tf = pickle.loads(pickle.dumps(clip.image_transform()))  # runs in DataLoader workers
    batch = clip.collate([tf(Image.new("RGB", (40, 30), c)) for c in ((255, 0, 0), (0, 0, 255))])
    texts = ["make it blue", "add a star"]
    img, txt = clip.embed_images(batch), clip.embed_texts(texts)
    for v in (img, txt):
        assert v.dtype == torch.float32 and v.shape == (2, 32)
        assert torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-5)
    summed = torch.nn.functional.normalize(img + txt, dim=1)
    assert torch.allclose(clip.embed_composed(batch, texts), summed, atol=1e-6)
    for mode, expect in (("image", img), ("text", txt), ("sum", summed), ("composed", summed)):
        clip.spec.mode = mode
        assert torch.allclose(clip.embed_queries(batch, texts), expect, atol=1e-6), mode
    clip.spec.mode = "composed"


def test_pickle_checkpoints_are_refused(tmp_path):
    from cirkit.errors import CheckpointError

    bad = tmp_path / "w.bin"
    bad.write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_backbone(BackboneSpec(backbone="clip", model="cirkit-tiny", pretrained=str(bad)))


def test_cli_baselines_on_synth(synth_dir, tiny_weights, tmp_path):
    from cirkit.cli import app

    out = tmp_path / "metrics.json"
    r = CliRunner().invoke(app, [
        "evaluate", "synth", "-d", str(synth_dir / "benchmark"), "--split", "test",
        "-b", "clip", "-m", "cirkit-tiny", "--pretrained", str(tiny_weights),
        "--mode", "image", "--mode", "text", "--mode", "sum",
        "--batch-size", "32", "--num-workers", "0", "-o", str(out),
    ])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert m["modes"] == ["image", "text", "sum"] and m["backbone"] == "clip" and m["dim"] == 32
    assert m["pretrained"] == str(tiny_weights) and m["model"] == "cirkit-tiny"
    for mode in ("image", "text", "sum"):
        assert 0.0 <= m[f"{mode}/test/R@1"] <= m[f"{mode}/test/R@50"] <= 100.0
    assert m["primary_metric"] == "image/test/R@1"
    assert m["image/test/R@1"] == 0.0  # the reference is in the gallery and is its own nearest image


# -- QuickGELU: the activation the weights were trained with (issue 15.1) ----------------------
# (model, tag, QuickGELU?) read from open_clip 3.3's pretrained registry by quick_gelu_for; the
# expected column is what the registry's tag says, checked against the registry below.
TAGS = [
    ("ViT-B-32", "openai", True),
    ("ViT-L-14", "openai", True),
    ("ViT-B-16", "openai", True),
    ("ViT-B-32", "laion2b_s34b_b79k", False),
    ("ViT-L-14", "laion2b_s32b_b82k", False),
    ("ViT-B-16", "metaclip_400m", True),  # not only OpenAI: MetaCLIP was trained with QuickGELU too
    ("ViT-B-32-quickgelu", "openai", True),  # the -quickgelu config already says so
    ("ViT-B-32", None, False),  # random init: the config's own activation
]


def _activation(model) -> type:
    kinds = {type(m.mlp.gelu) for m in model.modules() if hasattr(m, "mlp") and hasattr(m.mlp, "gelu")}
    assert len(kinds) == 1, kinds  # one activation in both towers
    return kinds.pop()


@pytest.mark.parametrize(("model", "tag", "quick"), TAGS)
def test_activation_per_pretrained_tag_on_the_real_architectures(model, tag, quick):
    """open_clip create_model with pretrained=None (no download) plus cirkit's decision, one block per tower."""
    import open_clip
    from open_clip.transformer import QuickGELU

    from cirkit.backbones._openclip import quick_gelu_for
    from cirkit.testing import open_clip_at_depth

    if tag is not None:
        assert bool(open_clip.get_pretrained_cfg(model, tag).get("quick_gelu")) == quick  # the registry agrees
    assert quick_gelu_for(model, tag) == quick
    clip = open_clip.create_model(model, pretrained=None, force_quick_gelu=quick_gelu_for(model, tag),
                                  **open_clip_at_depth(model, 1))
    assert (_activation(clip) is QuickGELU) == quick
    assert clip.visual.transformer.width == open_clip.get_model_config(model)["vision_cfg"]["width"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ViT-B-32", "ViT-L-14"])
def test_the_clip_baseline_and_the_vit_backbone_get_quickgelu_for_openai_whatever_the_name(model):
    """The README's baseline (`--backbone clip -m ViT-L-14 --pretrained openai`) and the vit backbone alike."""
    from open_clip.transformer import QuickGELU

    from cirkit.testing import shallow_open_clip

    calls: list = []
    with shallow_open_clip(layers=1, calls=calls):
        clip = load_backbone(BackboneSpec(backbone="clip", model=model, pretrained="openai"))
        vit = load_backbone(BackboneSpec(backbone="vit", model=model, pretrained="openai"))
        laion = load_backbone(BackboneSpec(backbone="clip", model=model, pretrained="laion2b_s34b_b79k"
                                           if model == "ViT-B-32" else "laion2b_s32b_b82k"))
    assert _activation(clip.model) is QuickGELU and _activation(vit.model.clip) is QuickGELU
    assert _activation(laion.model) is torch.nn.GELU
    assert [kw["force_quick_gelu"] for _, kw in calls] == [True, True, False]


def test_an_open_clip_config_that_asks_for_quickgelu_is_honoured(tmp_path):
    """hf-hub:/local-dir: models carry their own open_clip_config.json; its quick_gelu flag decides."""
    import open_clip
    from open_clip.transformer import QuickGELU

    from cirkit.backbones._openclip import create_clip, quick_gelu_for

    cfg = open_clip.get_model_config("cirkit-tiny")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**cfg, "quick_gelu": True}}))
    model, _, _ = create_clip(f"local-dir:{tmp_path}")
    assert quick_gelu_for(f"local-dir:{tmp_path}", "openai") is False  # the folder's config decides, not a tag
    assert _activation(model) is QuickGELU
