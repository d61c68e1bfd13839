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
