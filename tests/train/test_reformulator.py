"""The fine-tuned reformulator (seed 001 §II-A): ``cirkit train --backbone reformulator`` then ``reformulate -m``.

A tiny Llama built from a real config (cirkit.testing.build_tiny_causal_lm) is LoRA-tuned on a
few exact (caption A, caption B -> edit) examples; its checkpoint folder must reload and write
the same instructions, use the prompt it was tuned with, and never write for its seed pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from cirkit.checkpoint import check_folder, read_config  # noqa: E402
from cirkit.errors import CirkitError, RecordError  # noqa: E402
from cirkit.reformulate import ReformulateConfig, normalize  # noqa: E402
from cirkit.reformulate import run as reformulate  # noqa: E402
from cirkit.train import run as train  # noqa: E402
from cirkit.train.config import TrainConfig  # noqa: E402
from cirkit.train.reformulator import TUNED_PROMPT, TUNED_SYSTEM, ReformulatorTrainPlugin  # noqa: E402

COLOURS = ("red", "blue", "green", "yellow", "white", "black")
SHAPES = ("circle", "star", "square")


def _caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape} on a gray background"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    from cirkit.testing import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm") / "lm")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Captions of 18 images and 12 seed triplets (colour edits) between some of them."""
    d = tmp_path_factory.mktemp("reformulator-data")
    caps = [{"id": f"{c}-{s}", "image": f"img/{c}-{s}.png", "caption": _caption(c, s),
             "group": "all"} for c in COLOURS for s in SHAPES]
    (d / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in caps))
    seeds = []
    for n, (a, b) in enumerate(zip(COLOURS, COLOURS[1:] + COLOURS[:1], strict=True)):
        for s in SHAPES[:2]:
            seeds.append({"id": f"seed{n}{s}", "reference": f"img/{a}-{s}.png", "target": f"img/{b}-{s}.png",
                          "instruction": f"make the {s} {b}", "reference_caption": _caption(a, s),
                          "target_caption": _caption(b, s)})
    seeds.append({**seeds[0], "id": "bad", "instruction": "make it ??? blue"})  # the filters reject it
    (d / "seed.jsonl").write_text("".join(json.dumps(x) + "\n" for x in seeds))
    return d


def _cfg(tiny: Path, folder: Path, out: Path, **kw) -> TrainConfig:
    base = dict(backbone="reformulator", data=folder / "seed.jsonl", model=str(tiny), output=out, epochs=3,
                batch_size=4, lr=5e-3, weight_decay=0.0, warmup_steps=0, lora_r=4, lora_alpha=8,
                lora_dropout=0.0, num_workers=0, save_every=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tuned(tiny_lm, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "reformulator"
    result = train(_cfg(tiny_lm, data, out))
    assert result.details["max_steps"] == 9  # 12 usable examples / 4 x 3 epochs ("bad" is left out)
    return out


def _write(captions: Path, model: Path, out: Path, **kw) -> list[dict]:
    reformulate(ReformulateConfig(captions=captions, output=out, model=str(model), count=20, pairing="random",
                                  max_new_tokens=6, max_words=40, batch_size=8, **kw))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    rej = out.with_name(out.stem + ".rejected.jsonl")
    rows += [json.loads(x) for x in rej.read_text().splitlines()] if rej.exists() else []
    return sorted(rows, key=lambda r: r["id"])


@pytest.mark.slow
def test_adapter_saves_reloads_and_writes_the_same_instructions(tuned, tiny_lm, data, tmp_path):
    cfg = check_folder(tuned, "reformulator")
    assert (tuned / "adapter_config.json").is_file() and (tuned / "adapter_model.safetensors").is_file()
    assert cfg["base_model"] == str(tiny_lm.resolve()) and cfg["prompt"] == TUNED_PROMPT
    assert cfg["system"] == TUNED_SYSTEM and len(cfg["seed_pairs"]) == 12

    first = _write(data / "captions.jsonl", tuned, tmp_path / "a.jsonl")
    again = _write(data / "captions.jsonl", tuned, tmp_path / "b.jsonl")  # a fresh load of the folder
    assert len(first) == 20
    assert [(r["id"], r.get("output", r.get("instruction"))) for r in first] == \
           [(r["id"], r.get("output", r.get("instruction"))) for r in again]
    gen = first[0]["generator"]
    assert gen["prompt"] == TUNED_PROMPT and gen["system"] == TUNED_SYSTEM and gen["examples"] == []

    # the adapter is really applied: the base model with the same prompt writes something else
    base = _write(data / "captions.jsonl", tiny_lm, tmp_path / "base.jsonl", prompt=TUNED_PROMPT, system=TUNED_SYSTEM)
    assert [r["id"] for r in base] == [r["id"] for r in first]
    assert [r.get("output", r.get("instruction")) for r in base] != [r.get("output", r.get("instruction")) for r in first]


@pytest.mark.slow
def test_tuned_reformulator_never_writes_for_its_seed_pairs(tuned, data, tmp_path):
    seed = {tuple(p) for p in read_config(tuned)["seed_pairs"]}
    rows = _write(data / "captions.jsonl", tuned, tmp_path / "all.jsonl")  # random pairing
    # same-group over one group draws from the full list: every ordered pair but the seed pairs
    reformulate(ReformulateConfig(captions=data / "captions.jsonl", output=tmp_path / "many.jsonl", model=str(tuned),
                                  count=18 * 17, max_pairs_per_image=17, pairing="same-group", max_new_tokens=2,
                                  max_words=40, batch_size=64))
    many = [json.loads(x) for x in (tmp_path / "many.jsonl").read_text().splitlines()]
    rej = tmp_path / "many.rejected.jsonl"
    many += [json.loads(x) for x in rej.read_text().splitlines()] if rej.exists() else []
    drawn = {(normalize(r["reference_caption"]), normalize(r["target_caption"])) for r in many + rows}
    assert drawn and not drawn & seed
    assert len(many) == 18 * 17 - len(seed)


def test_reformulator_refusals_are_one_line(tiny_lm, data, tmp_path):
    with pytest.raises(CirkitError, match="trains on triplets only"):
        ReformulatorTrainPlugin(_cfg(tiny_lm, data, tmp_path / "x", stage="1"))
    with pytest.raises(CirkitError, match="drop --init"):
        ReformulatorTrainPlugin(_cfg(tiny_lm, data, tmp_path / "x", init=str(tmp_path)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"reference_caption": "a red star", "instruction": "make it blue"}) + "\n")
    plugin = ReformulatorTrainPlugin(_cfg(tiny_lm, data, tmp_path / "x", data=bad))
    plugin.build()
    with pytest.raises(RecordError, match="target_caption"):
        plugin.dataset()


def test_reformulate_refuses_a_retrieval_checkpoint_as_model(data, tmp_path):
    from cirkit.checkpoint import write_config

    vit = tmp_path / "vit"
    vit.mkdir()
    write_config(vit, "vit", model="cirkit-tiny")
    with pytest.raises(CirkitError, match="retrieval checkpoint, not a reformulator"):
        reformulate(ReformulateConfig(captions=data / "captions.jsonl", output=tmp_path / "t.jsonl", model=str(vit)))


def test_lora_on_the_top_layers_only(tiny_lm, data, tmp_path):
    from cirkit.train import plugin_for

    plugin = ReformulatorTrainPlugin(_cfg(tiny_lm, data, tmp_path / "x", lora_layers=1))
    model = plugin.build()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".layers.1." in n and "lora_" in n for n in trained)  # the tiny Llama has 2 layers
    with pytest.raises(CirkitError, match="has 2 layers"):
        ReformulatorTrainPlugin(_cfg(tiny_lm, data, tmp_path / "x", lora_layers=3)).build()
    with pytest.raises(CirkitError, match="--backbone reformulator only"):
        plugin_for(_cfg(tiny_lm, data, tmp_path / "x", backbone="mllm", lora_layers=1))
