"""Checkpoint folders other tools load (issue 14): a merged mllm folder is a transformers model folder,
an adapter folder is a peft adapter, and both load in a process that never imports cirkit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("peft")

# A child with the repository off sys.path: whatever it loads, it loads without cirkit.
PLAIN = """
import json, sys
sys.path = [p for p in sys.path if p not in ("", {root!r})]
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image

def checksum(model):
    return float(sum(p.detach().double().sum() for p in model.state_dict().values()))

out = {{}}
folder, base = {folder!r}, {base!r}
if folder:
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    enc = processor(images=[Image.new("RGB", (32, 32), "red")], text=["<image> a red circle"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    out.update(kind=type(model).__name__, checksum=checksum(model), logits=list(logits.shape))
if base:
    from peft import PeftModel
    merged = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), {adapter!r}).merge_and_unload()
    out["peft_checksum"] = checksum(merged)
assert not [m for m in sys.modules if m == "cirkit" or m.startswith("cirkit.")]
print(json.dumps(out))
"""
ROOT = str(Path(__file__).resolve().parents[2])


def plain(folder: Path | None = None, base: Path | None = None, adapter: Path | None = None) -> dict:
    code = PLAIN.format(root=ROOT, folder=str(folder or ""), base=str(base or ""), adapter=str(adapter or ""))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**env, "HF_HUB_OFFLINE": "1"}, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train(tiny_llava: Path, mllm_data: Path, out: Path, *extra: str) -> Path:
    from cirkit.cli import app

    res = CliRunner().invoke(app, ["-q", "train", str(mllm_data / "captions.jsonl"), "--backbone", "mllm", "--stage",
                                   "1", "-m", str(tiny_llava), "-o", str(out), "--max-steps", "2", "--batch-size", "4",
                                   "--lr", "5e-3", "--lora-r", "4", "--num-workers", "0", *extra])
    assert res.exit_code == 0, (res.stderr, res.exception)
    return out


@pytest.fixture(scope="module")
def merged(tiny_llava, mllm_data, tmp_path_factory):
    return train(tiny_llava, mllm_data, tmp_path_factory.mktemp("ck") / "merged", "--merge")


@pytest.mark.slow
def test_a_merged_folder_loads_with_plain_transformers_and_equals_base_plus_adapter(merged, tiny_llava):
    from cirkit.checkpoint import read_config

    assert json.loads((merged / "config.json").read_text())["model_type"] == "llava"
    assert {"cirkit.json", "generation_config.json", "model.safetensors", "train_args.json"} <= {
        p.name for p in merged.iterdir()}
    assert not (merged / "adapter_config.json").exists()  # transformers would load base + adapter instead
    assert {p.name for p in (merged / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert (merged / "processor_config.json").exists() or (merged / "preprocessor_config.json").exists()
    assert read_config(merged)["merged"] is True
    got = plain(folder=merged, base=tiny_llava, adapter=merged / "adapter")
    assert got["kind"] == "LlavaForConditionalGeneration" and got["logits"][0] == 1
    assert got["checksum"] == pytest.approx(got["peft_checksum"], rel=1e-6)  # merged == base + the peft adapter


@pytest.mark.slow
def test_cirkit_loads_new_and_old_merged_layouts_alike(merged, mllm_data, tmp_path):
    import torch

    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec
    from cirkit.checkpoint import SETTINGS

    old = tmp_path / "old"  # the layout before cirkit.json: cirkit's config.json, no processor files
    old.mkdir()
    for name in ("model.safetensors", "train_args.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        shutil.copy2(merged / name, old / Path(name).name)
    shutil.copy2(merged / SETTINGS, old / "config.json")
    texts = ["make it red", "a blue circle"]
    new_vecs = load_backbone(BackboneSpec(model=str(merged))).embed_texts(texts)
    old_vecs = load_backbone(BackboneSpec(model=str(old))).embed_texts(texts)
    torch.testing.assert_close(new_vecs, old_vecs, atol=1e-5, rtol=0)
    moved = tmp_path / "moved"  # a merged folder needs no base model any more: it is the model
    shutil.copytree(merged, moved)
    cfg = json.loads((moved / SETTINGS).read_text())
    (moved / SETTINGS).write_text(json.dumps({**cfg, "base_model": str(tmp_path / "gone")}))
    torch.testing.assert_close(load_backbone(BackboneSpec(model=str(moved))).embed_texts(texts), new_vecs,
                               atol=1e-5, rtol=0)


@pytest.mark.slow
def test_an_adapter_folder_loads_with_plain_peft(tiny_llava, mllm_data, tmp_path):
    adapter = train(tiny_llava, mllm_data, tmp_path / "adapter")
    assert json.loads((adapter / "config.json").read_text())["backbone"] == "mllm"  # not a model folder: cirkit's
    assert not (adapter / "model.safetensors").exists() and not (adapter / "cirkit.json").exists()
    got = plain(base=tiny_llava, adapter=adapter)
    assert got["peft_checksum"] != 0


@pytest.mark.slow
def test_a_fully_fine_tuned_folder_is_a_model_folder_too(tiny_llava, mllm_data, tmp_path):
    full = train(tiny_llava, mllm_data, tmp_path / "full", "--full-finetune")
    assert json.loads((full / "config.json").read_text())["model_type"] == "llava"
    assert json.loads((full / "cirkit.json").read_text())["weights"] == "full" and not (full / "adapter").exists()
    assert plain(folder=full)["kind"] == "LlavaForConditionalGeneration"
