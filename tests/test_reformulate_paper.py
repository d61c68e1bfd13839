"""`reformulate` as the ViT paper ran it: Table I's prompt as the `paper` preset, pairing at a folder level.

The paper text below is copied from "Scaling Prompt Instructed Zero Shot Composed Image Retrieval
with Image-Only Data", Table I (bottom), with its placeholders as printed; the code may only
respell the placeholders. Pairing levels run on a nested tree shaped like Fashion200k
(``women/<meta class>/<category>/<product>/<photo>``), where the paper pairs within a meta class
(section IV-A) and the whole folder would pair two photos of one product.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cirkit.cli import app
from cirkit.errors import CirkitError
from cirkit.records import Caption
from cirkit.reformulate import (
    DEFAULT_EXAMPLES,
    DEFAULT_PROMPT,
    DEFAULT_SYSTEM,
    PAPER_PROMPT,
    PROMPT_PRESETS,
    ReformulateConfig,
    group_keys,
    sample_pairs,
)

# Table I, "Reformulation Prompt", as printed in the paper.
PAPER_TABLE_I = (
    "You have two captions for two images, image A and image B, you are supposed to write a reformulation text "
    "describing changing from image A to image B. caption A: {Caption A} caption B: { Caption B } answer should be "
    "concise and within 12 words, only contain normal words, do not use special characters. Difference:"
)


def invoke(args):
    return CliRunner().invoke(app, args)


def one_error(res, code=1):
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


# -- the paper prompt ---------------------------------------------------------------------------------
def test_paper_prompt_is_table_i_verbatim():
    assert PAPER_PROMPT == PAPER_TABLE_I.replace("{Caption A}", "{reference}").replace("{ Caption B }", "{target}")
    paper = PROMPT_PRESETS["paper"]
    assert paper.prompt == PAPER_PROMPT
    assert paper.system is None and paper.examples == ()  # zero-shot, section II-A
    filled = PAPER_PROMPT.format(reference="a red dress", target="a blue dress")
    assert "caption A: a red dress caption B: a blue dress answer should be concise and within 12 words" in filled
    assert filled.endswith("do not use special characters. Difference:")


def test_cirkit_preset_is_the_unchanged_default():
    cirkit = PROMPT_PRESETS["cirkit"]
    assert (cirkit.prompt, cirkit.system, cirkit.examples) == (DEFAULT_PROMPT, DEFAULT_SYSTEM, DEFAULT_EXAMPLES)
    assert ReformulateConfig(captions=Path("c.jsonl")).prompt is None  # no preset named: cirkit's


def test_a_preset_name_needs_no_placeholders_and_other_text_does(tmp_path):
    for name in PROMPT_PRESETS:
        ReformulateConfig(captions=tmp_path / "c.jsonl", prompt=name).validate()
    with pytest.raises(CirkitError, match=r"a preset \(cirkit, paper\) or contain the placeholders"):
        ReformulateConfig(captions=tmp_path / "c.jsonl", prompt="papers").validate()


# -- a nested Fashion200k-like tree -------------------------------------------------------------------
METAS = {"dresses": "dress", "skirts": "skirt", "tops": "top"}
COLOURS = ["red", "blue", "green", "black"]


@pytest.fixture
def fashion(tmp_path):
    """Image files under women/<meta>/<category>/<product>/ and their captions.jsonl, with each record's
    ``group`` as `cirkit caption FOLDER` writes it (the folder below the image root)."""
    root = tmp_path / "fashion200k"
    records, n = [], 0
    for meta, noun in METAS.items():
        for cat in ("casual", "party"):
            for p in range(2):
                product = f"{meta[:2]}{cat[:2]}{p}"
                folder = root / "women" / meta / cat / product
                folder.mkdir(parents=True)
                for k in range(2):
                    image = folder / f"{product}_{k}.jpeg"
                    image.write_bytes(b"")  # pairing reads no pixels
                    colour = COLOURS[n % len(COLOURS)]
                    n += 1
                    rel = image.relative_to(root).as_posix()
                    records.append(Caption(id=rel, image=f"../fashion200k/{rel}",
                                           caption=f"a {colour} {cat} {noun} {product} photo {k}",
                                           group=image.parent.relative_to(root).as_posix()))
    data = tmp_path / "data"
    data.mkdir()
    path = data / "captions.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    return path, records


def meta_of(rec):
    return rec.group.split("/")[1]


def product_of(rec):
    return rec.group


def test_group_depth_pairs_across_products_within_a_meta_class_never_across(fashion):
    _, caps = fashion
    pairs = sample_pairs(caps, "same-group", 1000, seed=0, max_pairs_per_image=8, group_depth=2)
    assert pairs
    assert all(meta_of(caps[i]) == meta_of(caps[j]) for i, j in pairs)  # never across classes
    across = [(i, j) for i, j in pairs if product_of(caps[i]) != product_of(caps[j])]
    assert across and len({meta_of(caps[i]) for i, _ in across}) == len(METAS)  # across products, in every class
    assert {k.count("/") for k in group_keys(caps, group_depth=2)} == {1}  # keys are "women/<meta>"
    for c in caps:  # the same paths spelled "./women//dresses/..." group the same
        c.group = "./" + c.group.replace("/", "//", 1)
    assert sample_pairs(caps, "same-group", 1000, seed=0, max_pairs_per_image=8, group_depth=2) == pairs


def test_without_group_depth_the_whole_folder_is_the_group_as_before(fashion):
    _, caps = fashion
    pairs = sample_pairs(caps, "same-group", 1000, seed=0, max_pairs_per_image=8)
    assert pairs and all(product_of(caps[i]) == product_of(caps[j]) for i, j in pairs)  # two photos of one product
    assert group_keys(caps) == [c.group for c in caps]


def test_group_depth_counts_from_the_root_of_a_group_field(fashion):
    _, caps = fashion
    for c in caps:  # the same tree below another root, given as a field
        c.extra["path"], c.group = c.group.removeprefix("women/"), None
    pairs = sample_pairs(caps, "same-group", 1000, seed=0, max_pairs_per_image=8, group_field="path", group_depth=1)
    assert pairs and all(caps[i].extra["path"].split("/")[0] == caps[j].extra["path"].split("/")[0] for i, j in pairs)
    assert any(caps[i].extra["path"] != caps[j].extra["path"] for i, j in pairs)


def test_captions_shallower_than_the_depth_are_paired_with_nobody_and_named(fashion, caplog):
    _, caps = fashion
    caps[0].group, caps[1].group = "women", None  # an image straight under women/, one at the root
    with caplog.at_level(logging.WARNING, logger="cirkit"):
        keys = group_keys(caps, group_depth=2)
    assert keys[0] is None and keys[1] is None and all(keys[2:])
    assert "2 captions are not 2 folders deep" in caplog.text and caps[0].id in caplog.text
    pairs = sample_pairs(caps, "same-group", 1000, seed=0, max_pairs_per_image=8, group_depth=2)
    assert not [p for p in pairs if {0, 1} & set(p)]


def test_group_depth_without_any_group_is_an_error_not_the_captions_file_folder(tmp_path):
    caps = [Caption(id=f"i{k}", image=f"images/{k}.png", caption=f"a shape {k}") for k in range(4)]  # synth-like
    with pytest.raises(CirkitError, match="none of the 4 captions has a 'group'.*cirkit caption FOLDER"):
        group_keys(caps, group_depth=1)
    assert len(set(group_keys(caps))) == 1  # the default still falls back to the image's folder


# -- the CLI: bad values are one line, before any model loads -----------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    import cirkit.generation as gen

    def load(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(gen, "load_causal_lm", load)


@pytest.mark.parametrize("args,code,match", [
    (["--group-depth", "0"], 1, "--group-depth"),
    (["--group-depth", "-1"], 1, "--group-depth"),
    (["--group-depth", "two"], 2, "--group-depth"),
    (["--group-depth", "2"], 1, "--group-depth applies to --pairing same-group"),  # default pairing: random
    (["--group-depth", "2", "--pairing", "similar"], 1, "--group-depth applies to --pairing same-group"),
    (["--pairing", "same-group", "--group-depth", "5"], 1, "no caption's group is 5 folders deep.*smaller"),
    (["--prompt", "paper2"], 1, "preset"),
])
def test_bad_pairing_and_prompt_values_are_one_line_before_any_model(fashion, tmp_path, no_model, args, code, match):
    path, _ = fashion
    out = tmp_path / "out" / "t.jsonl"
    line = one_error(invoke(["reformulate", str(path), "-o", str(out), *args]), code)
    assert re.search(match, line), line
    assert not out.exists() and not out.with_name("t.rejected.jsonl").exists()


def test_group_depth_on_captions_without_groups_is_one_line_before_any_model(tmp_path, no_model):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(Caption(id=f"i{k}", image=f"{k}.png", caption=f"shape {k}").to_dict()) + "\n"
                            for k in range(3)))
    line = one_error(invoke(["reformulate", str(path), "-o", str(tmp_path / "t.jsonl"), "--pairing", "same-group",
                             "--group-depth", "1"]))
    assert "--group-depth 1: none of the 3 captions has a 'group'" in line
    assert not (tmp_path / "t.jsonl").exists()


def _pairs_in(out: Path) -> list[tuple[str, str]]:
    rows = []
    for p in (out, out.with_name(out.name.replace(".jsonl", ".rejected.jsonl"))):
        if p.exists():
            rows += [json.loads(x) for x in p.read_text().splitlines()]
    return [(r["reference_id"], r["target_id"]) for r in rows]


def test_cli_group_depth_through_the_template_generator(fashion, tmp_path):
    path, caps = fashion
    group = {c.id: c.group for c in caps}
    out = tmp_path / "t.jsonl"
    res = invoke(["reformulate", str(path), "-o", str(out), "-g", "template", "--pairing", "same-group",
                  "--group-depth", "2", "-n", "100", "--max-pairs-per-image", "4", "--json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    pairs = _pairs_in(out)
    assert pairs and all(group[r].split("/")[1] == group[t].split("/")[1] for r, t in pairs)
    assert any(group[r] != group[t] for r, t in pairs)
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert written and all(t["generator"]["group_depth"] == 2 for t in written)
    # resuming at another level (or the whole folder) would mix two kinds of pairs in one file: refused
    for other in (["--group-depth", "1"], []):
        line = one_error(invoke(["reformulate", str(path), "-o", str(out), "-g", "template", "--pairing", "same-group",
                                 *other, "-n", "100", "--max-pairs-per-image", "4"]))
        assert "written with group_depth 2" in line
    again = invoke(["reformulate", str(path), "-o", str(out), "-g", "template", "--pairing", "same-group",
                    "--group-depth", "2", "-n", "100", "--max-pairs-per-image", "4", "--json"])
    assert json.loads(again.stdout.strip().splitlines()[-1])["details"]["nothing_to_do"] is True


# -- presets reached from the CLI and the recipe, on a tiny real model ----------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from cirkit.testing import build_tiny_causal_lm

    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("lm")))


@pytest.fixture
def seen_prompts(monkeypatch):
    """The prompts handed to the model (generation itself runs for real)."""
    import cirkit.generation as gen

    seen: list[str] = []
    real = gen.generate_texts

    def spy(lm, prompts, settings, prefix=None):
        seen.extend(prompts)
        return real(lm, prompts, settings, prefix)

    monkeypatch.setattr(gen, "generate_texts", spy)
    return seen


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for p in (out, out.with_name(out.name.replace(".jsonl", ".rejected.jsonl"))) if p.exists()
            for x in p.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["paper", "cirkit"])
def test_each_preset_is_reachable_from_the_cli(fashion, tmp_path, tiny_lm, seen_prompts, preset):
    path, caps = fashion
    out = tmp_path / "t.jsonl"
    res = invoke(["reformulate", str(path), "-o", str(out), "-m", tiny_lm, "--prompt", preset, "-n", "4",
                  "--max-new-tokens", "3", "--device", "cpu", "--max-words", "50"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    want = PROMPT_PRESETS[preset]
    recs = _records(out)
    assert len(recs) == 4
    for r in recs:
        g = r["generator"]
        assert g["prompt"] == want.prompt and g["system"] == want.system
        assert g["examples"] == [list(e) for e in want.examples]
    assert len(seen_prompts) == 4
    by_caption = {c.caption for c in caps}
    for text in seen_prompts:
        if preset == "paper":  # Table I with the two captions in place, nothing else asked
            head, _, rest = text.partition("caption A: ")
            assert PAPER_TABLE_I.split(" caption A:")[0] in head and DEFAULT_EXAMPLES[0][0] not in text
            a, _, rest = rest.partition(" caption B: ")
            b, _, tail = rest.partition(" answer should be concise")
            assert a in by_caption and b in by_caption
            assert tail.startswith(" and within 12 words, only contain normal words, do not use special characters. "
                                   "Difference:")
        else:
            assert DEFAULT_EXAMPLES[0][0] in text and DEFAULT_SYSTEM in text
    # the same preset again resumes (its text is what the records hold); the other is refused
    same = ["--prompt", want.prompt] if preset == "paper" else []  # the text itself / no --prompt at all
    again = invoke(["reformulate", str(path), "-o", str(out), "-m", tiny_lm, *same, "-n", "4", "--max-new-tokens", "3",
                    "--device", "cpu", "--max-words", "50", "--json"])
    assert again.exit_code == 0, (again.stdout, again.stderr)
    assert json.loads(again.stdout.strip().splitlines()[-1])["details"]["nothing_to_do"] is True
    other = "cirkit" if preset == "paper" else "paper"
    line = one_error(invoke(["reformulate", str(path), "-o", str(out), "-m", tiny_lm, "--prompt", other, "-n", "4",
                             "--device", "cpu"]))
    assert "written with prompt" in line


@pytest.mark.slow
def test_the_fashion200k_recipe_pairs_within_meta_classes_with_the_paper_prompt(fashion, tmp_path, tiny_lm):
    path, caps = fashion
    group = {c.id: c.group for c in caps}
    out = tmp_path / "t.jsonl"
    res = invoke(["reformulate", str(path), "-o", str(out), "-c", "recipes/reformulate-fashion200k-paper.yaml",
                  "-m", tiny_lm, "--max-new-tokens", "3", "--device", "cpu", "--json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    recs = _records(out)
    assert len(recs) == len(caps)  # one pair per image (the recipe's max_pairs_per_image: 1)
    assert all(r["generator"]["prompt"] == PAPER_PROMPT and r["generator"]["pairing"] == "same-group" for r in recs)
    pairs = [(r["reference_id"], r["target_id"]) for r in recs]
    assert all(group[a].split("/")[1] == group[b].split("/")[1] for a, b in pairs)
    assert sum(group[a] != group[b] for a, b in pairs) > len(pairs) // 2  # mostly other products of the class


def test_the_paper_recipes_resolve_to_the_paper_settings():
    from cirkit.caption import PAPER_PROMPT as PAPER_CAPTION_PROMPT
    from cirkit.caption import CaptionConfig, resolve_prompt
    from cirkit.config import resolve

    cfg = resolve(ReformulateConfig, "recipes/reformulate-fashion200k-paper.yaml", {"captions": "c.jsonl"},
                  section="reformulate")
    assert (cfg.prompt, cfg.pairing, cfg.group_depth, cfg.max_words) == ("paper", "same-group", 2, 12)
    cap = resolve(CaptionConfig, "recipes/caption-llava-1.5-13b-paper.yaml", {"images": "photos"}, section="caption")
    assert cap.model == "llava-hf/llava-1.5-13b-hf" and resolve_prompt(cap.prompt) == PAPER_CAPTION_PROMPT
    cheap = resolve(CaptionConfig, "recipes/caption-llava-1.5.yaml", {"images": "photos"}, section="caption")
    assert cheap.model == "llava-hf/llava-1.5-7b-hf" and cheap.prompt is None
