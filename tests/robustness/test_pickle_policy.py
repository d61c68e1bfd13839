"""No pickle without --allow-pickle, decided by a file's content wherever weights are loaded.

Each way a weights file reaches a loader: open_clip ``--pretrained`` files under any name,
tags and ``hf-hub:`` downloads, ``local-dir:`` folders (also when a vit checkpoint's
config.json names one), vit checkpoints, mllm checkpoints (adapter and base model folder), mllm
model folders, and the same for ``cirkit train``. ``torch.load`` is replaced by a probe that
fails the test, so "refused" means nothing was unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import fails, ok, png_folder

torch = pytest.importorskip("torch")

PICKLE_LINE = "pickle checkpoints can run code when loaded; convert to .safetensors or pass --allow-pickle if you trust the file"


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"torch.load called on {a[:1]}")

    monkeypatch.setattr(torch, "load", refuse)


def _pickle(path: Path, legacy: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=not legacy)
    return path


def _embed_clip(tmp_path: Path, *model: str) -> list[str]:
    png_folder(tmp_path / "g", 2)
    return ["embed", str(tmp_path / "g"), "--backbone", "clip", *model, "-o", str(tmp_path / "g.lance"),
            "--num-workers", "0"]


# -- open_clip weights ---------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", ["weights.ckpt", "weights.PT", "weights.pkl", "weights", "weights.pth.tar"])
def test_pretrained_pickle_under_any_name_is_refused(tmp_path, no_unpickling, name, legacy):
    weights = _pickle(tmp_path / name, legacy)
    line = fails(_embed_clip(tmp_path, "--model", "cirkit-tiny", "--pretrained", str(weights)))
    assert line == f"error: {weights}: {PICKLE_LINE}"


def test_pretrained_safetensors_under_another_name_gets_a_rename_hint(tmp_path, no_unpickling):
    from safetensors.torch import save_file

    weights = tmp_path / "weights.bin"
    save_file({"w": torch.zeros(2)}, str(weights))
    line = fails(_embed_clip(tmp_path, "--model", "cirkit-tiny", "--pretrained", str(weights)))
    assert line == (f"error: {weights}: a safetensors file that open_clip would read with torch.load "
                    "(it goes by the name); rename it to end in .safetensors")


def test_pretrained_named_safetensors_but_holding_pickle_is_refused(tmp_path, no_unpickling):
    weights = _pickle(tmp_path / "weights.safetensors")
    line = fails(_embed_clip(tmp_path, "--model", "cirkit-tiny", "--pretrained", str(weights)))
    assert line.startswith(f"error: {weights}: not a safetensors file")


def test_allow_pickle_lets_the_file_through(tmp_path):
    from cirkit.backbones._openclip import _check_weights_file

    weights = _pickle(tmp_path / "weights.ckpt")
    _check_weights_file("cirkit-tiny", str(weights), allow_pickle=True)


def test_a_tag_whose_download_is_pickle_is_refused(tmp_path, monkeypatch, no_unpickling):
    import open_clip

    from cirkit.backbones._openclip import create_clip
    from cirkit.errors import CheckpointError

    cached = _pickle(tmp_path / "hub" / "open_clip_pytorch_model.bin")
    monkeypatch.setattr("cirkit.hub.check_model", lambda *a, **k: None)  # the hub serves the file in this test
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", lambda cfg, **kw: str(cached))
    with pytest.raises(CheckpointError, match=f"^{cached}: pickle checkpoints can run code"):
        create_clip("ViT-B-32", "openai")


def test_an_hf_hub_model_whose_weights_are_pickle_is_refused(tmp_path, monkeypatch, no_unpickling):
    import open_clip

    from cirkit.backbones._openclip import create_clip
    from cirkit.errors import CheckpointError

    cached = _pickle(tmp_path / "hub" / "open_clip_pytorch_model.bin")
    seen = []
    monkeypatch.setattr("cirkit.hub.check_model", lambda *a, **k: None)  # the hub serves the file in this test
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", lambda mid, **kw: seen.append(mid) or str(cached))
    with pytest.raises(CheckpointError, match=f"^{cached}: pickle checkpoints can run code"):
        create_clip("hf-hub:someone/clip")
    assert seen == ["someone/clip"]


def _local_dir(folder: Path, pickle: bool) -> Path:
    """An open_clip ``local-dir:`` folder holding cirkit-tiny's config and weights (pickle or safetensors)."""
    import open_clip

    from cirkit.backbones._openclip import register_configs

    register_configs()
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("cirkit-tiny")}))
    model = open_clip.create_model("cirkit-tiny")
    if pickle:
        torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_local_dir_pickle_weights_are_refused(tmp_path, no_unpickling):
    folder = _local_dir(tmp_path / "clipdir", pickle=True)
    line = fails(_embed_clip(tmp_path, "--model", f"local-dir:{folder}"))
    assert line == f"error: {folder / 'open_clip_pytorch_model.bin'}: {PICKLE_LINE}"


def test_local_dir_safetensors_weights_load(tmp_path, no_unpickling):
    folder = _local_dir(tmp_path / "clipdir", pickle=False)
    assert ok(_embed_clip(tmp_path, "--model", f"local-dir:{folder}"))["counts"]["embedded"] == 2


@pytest.fixture
def vit_on_local_dir(vit_checkpoint, tmp_path) -> tuple[Path, Path]:
    """A vit checkpoint whose config.json names an open_clip ``local-dir:`` model with pickle weights."""
    import shutil

    ck = Path(shutil.copytree(vit_checkpoint, tmp_path / "ck"))
    folder = _local_dir(tmp_path / "clipdir", pickle=True)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"] = f"local-dir:{folder}"
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck, folder


def test_a_checkpoint_naming_a_local_dir_of_pickle_weights_is_refused(vit_on_local_dir, tmp_path, no_unpickling):
    ck, folder = vit_on_local_dir
    png_folder(tmp_path / "g", 2)
    args = ["embed", str(tmp_path / "g"), "--model", str(ck), "-o", str(tmp_path / "g.lance"), "--num-workers", "0"]
    assert fails(args) == f"error: {folder / 'open_clip_pytorch_model.bin'}: {PICKLE_LINE}"


def test_allow_pickle_reaches_a_checkpoints_local_dir(vit_on_local_dir, tmp_path):
    ck, _ = vit_on_local_dir
    png_folder(tmp_path / "g", 2)
    args = ["embed", str(tmp_path / "g"), "--model", str(ck), "-o", str(tmp_path / "g.lance"), "--num-workers", "0",
            "--allow-pickle"]
    assert ok(args)["counts"]["embedded"] == 2


# -- mllm folders and checkpoints ----------------------------------------------------------------------------
def _embed_mllm(tmp_path: Path, model: Path, *extra: str) -> list[str]:
    png_folder(tmp_path / "g", 2)
    return ["embed", str(tmp_path / "g"), "--backbone", "mllm", "--model", str(model), "-o", str(tmp_path / "g.lance"),
            *extra]


@pytest.mark.parametrize("name", ["pytorch_model.bin", "pytorch_model.pt", "weights", "model.ckpt"])
def test_mllm_folder_of_pickle_weights_under_any_name_needs_allow_pickle(tmp_path, no_unpickling, name):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _pickle(model / name)
    kind = Path(name).suffix or name
    line = fails(_embed_mllm(tmp_path, model))
    assert line == f"error: {model}: only pickle ({kind}) weights found; convert to safetensors or pass --allow-pickle"


def test_mllm_folder_whose_model_safetensors_is_damaged(tmp_path, no_unpickling):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _pickle(model / "model.safetensors")  # pickle content under the safetensors name
    assert fails(_embed_mllm(tmp_path, model)).startswith(f"error: {model / 'model.safetensors'}: not a safetensors file")


def _mllm_checkpoint(root: Path, base: Path) -> Path:
    from safetensors.torch import save_file

    from cirkit.checkpoint import write_config

    ck = root / "mck"
    ck.mkdir()
    write_config(ck, "mllm", base_model=str(base))
    save_file({"w": torch.zeros(1)}, str(ck / "model.safetensors"))
    return ck


def test_mllm_checkpoint_on_a_base_folder_of_pickle_weights(tmp_path, no_unpickling):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    _pickle(base / "pytorch_model.bin")
    ck = _mllm_checkpoint(tmp_path, base)
    line = fails(_embed_mllm(tmp_path, ck))
    assert line == f"error: {base}: only pickle (.bin) weights found; convert to safetensors or pass --allow-pickle"


@pytest.mark.parametrize("allow", [False, True])
def test_mllm_checkpoint_with_a_pickle_adapter_is_refused_even_when_allowed(tmp_path, no_unpickling, allow):
    ck = _mllm_checkpoint(tmp_path, tmp_path / "base")
    (ck / "model.safetensors").unlink()
    (ck / "adapter_config.json").write_text("{}")
    _pickle(ck / "adapter_model.bin")
    line = fails(_embed_mllm(tmp_path, ck, *(["--allow-pickle"] if allow else [])))
    assert line == (f"error: {ck}: no adapter_model.safetensors, only pickle weights (adapter_model.bin); "
                    "cirkit checkpoints load from safetensors only, never from pickle")


# -- cirkit train ----------------------------------------------------------------------------------------
def _captions(root: Path) -> Path:
    png_folder(root / "imgs", 4)
    (root / "captions.jsonl").write_text("".join(
        json.dumps({"id": f"i{i}", "image": f"imgs/im{i:03d}.png", "caption": f"c {i}"}) + "\n" for i in range(4)))
    return root / "captions.jsonl"


def test_train_refuses_pickle_pretrained_weights(tmp_path, no_unpickling):
    weights = _pickle(tmp_path / "w.ckpt")
    line = fails(["train", str(_captions(tmp_path / "d")), "--stage", "1", "--model", "cirkit-tiny", "--pretrained",
                  str(weights), "-o", str(tmp_path / "run"), "--num-workers", "0", "--max-steps", "1"])
    assert line == f"error: {weights}: {PICKLE_LINE}"


def test_train_refuses_an_init_naming_a_local_dir_of_pickle_weights(vit_on_local_dir, tmp_path, no_unpickling):
    ck, folder = vit_on_local_dir
    line = fails(["train", str(_captions(tmp_path / "d")), "--stage", "1", "--init", str(ck), "-o",
                  str(tmp_path / "run"), "--num-workers", "0", "--max-steps", "1"])
    assert line == f"error: {folder / 'open_clip_pytorch_model.bin'}: {PICKLE_LINE}"


def test_train_mllm_refuses_a_model_folder_of_pickle_weights(tmp_path, no_unpickling):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _pickle(model / "pytorch_model.bin")
    line = fails(["train", str(_captions(tmp_path / "d")), "--backbone", "mllm", "--stage", "1", "--model", str(model),
                  "-o", str(tmp_path / "run"), "--num-workers", "0", "--max-steps", "1"])
    assert line == f"error: {model}: only pickle (.bin) weights found; convert to safetensors or pass --allow-pickle"
