"""Every fixture annotation file parses through its adapter, quirks included.

Each test runs per fixture source (``[project]``, and ``[upstream]`` when the real samples are
present); the literal expectations per source are in ``conftest.FACTS``.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from cirkit.errors import CirkitError, RecordError
from cirkit.evaluate import detect_benchmark, load_benchmark
from cirkit.evaluate.fashioniq import join_captions


def test_every_fixture_file_is_read_by_an_adapter(fixtures, tmp_path):
    read = set()
    for split in ("val", "test"):
        fiq = load_benchmark("fashioniq", fixtures / "fashioniq", tmp_path)
        for t in fiq.load(split):
            read.update({t.details["captions"], t.details["image_split"]})
    cirr = load_benchmark("cirr", fixtures / "cirr", tmp_path)
    for split in ("val", "test1"):
        task = cirr.load(split)[0]
        read.update(task.details.values())
        ext = cirr.caption_extensions(split)
        assert set(ext) == {q.id for q in task.queries}
        read.add(str(fixtures / "cirr" / "captions_ext" / f"cap.ext.rc2.{split}.json"))
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "000000000001.jpg").write_bytes(b"x")
    circo = load_benchmark("circo", fixtures / "circo", tmp_path / "coco")
    for split in ("val", "test"):
        read.add(circo.load(split)[0].details["annotations"])
    gen = load_benchmark("genecis", fixtures / "genecis", tmp_path)
    read.update(t.details["file"] for t in gen.load("val"))
    # the rest are the official submission examples, read by tests/evaluate/test_submission.py
    others = {"submission_examples", "demo_files"}
    every = {
        str(p) for p in fixtures.rglob("*.json") if not any(part in others for part in p.parts)
    }
    assert every == read


def test_fashioniq(fixtures, facts, tmp_path, load_json):
    fiq = load_benchmark("fashioniq", fixtures / "fashioniq", tmp_path)
    tasks = fiq.load("val")
    assert [t.name for t in tasks] == ["dress", "shirt", "toptee"]
    assert [len(t.queries) for t in tasks] == facts.fiq_val_queries
    assert [len(t.gallery) for t in tasks] == facts.fiq_val_gallery
    dress = tasks[0]
    q0 = dress.queries[0]
    text, target, candidate = facts.fiq_first
    assert q0.text == text
    assert q0.targets == [target] and q0.reference_id == candidate
    assert q0.reference == str(tmp_path / f"{candidate}.png")
    # records with an empty first caption (real ones upstream): the empty part is dropped, no leading "and"
    cat, i, text = facts.fiq_empty_first
    assert load_json(f"fashioniq/captions/cap.{tasks[cat].name}.val.json")[i]["captions"][0] == ""
    assert tasks[cat].queries[i].text == text
    assert all(q.text and not q.text.startswith("and") for t in tasks for q in t.queries)
    assert not any(t.exclude_reference for t in tasks)
    test = fiq.load("test")
    assert all(not t.has_ground_truth for t in test) and [len(t.queries) for t in test] == facts.fiq_test_queries


def test_fashioniq_caption_join_modes():
    caps = ["Is shiny.", " fit and flare? "]
    assert join_captions(caps) == "Is shiny and fit and flare"
    assert join_captions(caps, "first") == "Is shiny"
    assert join_captions(caps, "second") == "fit and flare"
    assert join_captions(["", "is grey"], "and") == "is grey"
    with pytest.raises(CirkitError):
        join_captions(caps, "or")


def test_cirr(fixtures, facts, tmp_path, load_json):
    cirr = load_benchmark("cirr", fixtures / "cirr", tmp_path)
    (val,) = cirr.load("val")
    assert (len(val.queries), len(val.gallery)) == facts.cirr_val
    assert val.exclude_reference and val.subset_ks == (1, 2, 3)
    name, rel = facts.cirr_gallery_entry
    assert val.gallery[name] == tmp_path / rel
    q = {q.id: q for q in val.queries}
    pairid, target = facts.cirr_query
    assert q[pairid].targets == [target] and len(q[pairid].subset) == 6
    soft = {str(r["pairid"]): r for r in load_json("cirr/captions/cap.rc2.val.json")}[facts.cirr_soft_missing]
    assert soft["target_hard"] not in soft["target_soft"]
    assert q[facts.cirr_soft_missing].targets == [soft["target_hard"]]  # missing from target_soft, still counts
    (test,) = cirr.load("test1")
    assert not test.has_ground_truth and len(test.queries) == facts.cirr_test1[0]
    assert {x.id: x.text for x in test.queries}[facts.cirr_blank_caption] == " "  # a caption of one space (real upstream)
    assert cirr.load("test")[0].name == "test1"


def test_circo(fixtures, facts, tmp_path, solid):
    reference, targets = facts.circo_first
    for i in (1, int(targets[0])):
        solid(tmp_path / f"{i:012d}.jpg")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "abc.jpg").write_bytes(b"ignored: not a numeric id")
    circo = load_benchmark("circo", fixtures / "circo", tmp_path)
    (val,) = circo.load("val")
    assert list(val.gallery) == ["1", targets[0]]
    q0 = val.queries[0]
    assert q0.targets == targets and q0.reference_id == reference
    assert q0.reference == str(tmp_path / f"{int(reference):012d}.jpg")
    assert val.map_ks == (5, 10, 25, 50) and val.recall_first_target_only
    assert not val.exclude_reference
    (test,) = circo.load("test")
    assert not test.has_ground_truth
    assert [q.id for q in test.queries] == [str(i) for i in range(facts.circo_test_queries)]
    # the official layout below the images root is found too
    nested = tmp_path / "root" / "COCO2017_unlabeled" / "unlabeled2017"
    solid(nested / "000000000007.jpg")
    assert list(load_benchmark("circo", fixtures / "circo", tmp_path / "root").load("val")[0].gallery) == ["7"]


def test_genecis(fixtures, facts, tmp_path, load_json):
    gen = load_benchmark("genecis", fixtures / "genecis", tmp_path)
    tasks = gen.load("val")
    assert [t.name for t in tasks] == ["focus_object", "change_object"]
    for t, n in zip(tasks, facts.genecis_queries, strict=True):
        raw = load_json(f"genecis/genecis/{t.name}.json")
        assert any(raw.count(r) > 1 for r in raw)  # duplicate records (as upstream) ...
        assert len(t.queries) == n == len(raw)  # ... are kept, as upstream scores them
        assert all(len(q.candidates) == 15 and q.candidates[0] == q.targets[0] for q in t.queries)
        assert t.details["dropped_records"] == 0
    i, condition, target = facts.genecis_target_copy
    copy = tasks[1].queries[i]
    assert copy.text == condition and copy.targets == [target]
    assert copy.candidates.count(target) == 2  # the target-in-gallery quirk (real upstream)
    raw = load_json("genecis/genecis/focus_object.json")
    assert tasks[0].queries[0].text == raw[0]["condition"]
    assert tasks[0].queries[1].reference == str(tmp_path / f"{int(facts.genecis_focus_reference):012d}.jpg")


def test_genecis_drops_records_with_an_odd_gallery_length(tmp_path, load_json):
    import json

    recs = load_json("genecis/genecis/change_object.json")[:5]
    recs[2] = dict(recs[2], gallery=recs[2]["gallery"][:3])
    (tmp_path / "change_object.json").write_text(json.dumps(recs))
    (task,) = load_benchmark("genecis", tmp_path, tmp_path).load("val")
    assert len(task.queries) == 4 and task.details["dropped_records"] == 1


def test_detect_benchmark(fixtures):
    assert detect_benchmark(fixtures / "fashioniq") == "fashioniq"
    assert detect_benchmark(fixtures / "cirr") == "cirr"
    assert detect_benchmark(fixtures / "circo") == "circo"
    assert detect_benchmark(fixtures / "genecis") == "genecis"
    with pytest.raises(CirkitError):
        detect_benchmark(fixtures / "cirr" / "captions")


def test_bad_annotation_files_name_the_file_and_record(tmp_path):
    (tmp_path / "captions").mkdir()
    (tmp_path / "image_splits").mkdir()
    (tmp_path / "captions" / "cap.rc2.val.json").write_text('[{"pairid": 1, "reference": "a"}]')
    (tmp_path / "image_splits" / "split.rc2.val.json").write_text('{"a": "./dev/a.png"}')
    with pytest.raises(RecordError, match=r"cap.rc2.val.json: field .caption.: record 0"):
        load_benchmark("cirr", tmp_path, tmp_path).load("val")
    (tmp_path / "captions" / "cap.rc2.val.json").write_text("[{")
    with pytest.raises(RecordError, match="malformed JSON"):
        load_benchmark("cirr", tmp_path, tmp_path).load("val")
    with pytest.raises(CirkitError, match="unknown benchmark"):
        load_benchmark("nope", tmp_path)


# -- the fixture files themselves ----------------------------------------------------------------
class Map:
    """A JSON object whose keys are data (ids), after an optional fixed ``head`` of named keys."""

    def __init__(self, key: str, value, head: dict | None = None):
        self.key, self.value, self.head = re.compile(key), value, head or {}


IMAGE = {"val_image_id": int}
# The upstream layout: every file's path, record fields in upstream order, value types, formatting.
SCHEMA = {
    "fashioniq/captions/cap.{cat}.val.json": ("indent", [{"target": str, "candidate": str, "captions": [str]}]),
    "fashioniq/captions/cap.{cat}.test.json": ("indent", [{"candidate": str, "captions": [str]}]),
    "fashioniq/image_splits/split.{cat}.{split}.json": ("indent", [str]),
    "cirr/captions/cap.rc2.val.json": ("compact", [{
        "pairid": int, "reference": str, "target_hard": str, "target_soft": Map(r"dev-[\w-]+", float), "caption": str,
        "img_set": {"id": int, "members": [str], "reference_rank": int, "target_rank": int}}]),
    "cirr/captions/cap.rc2.test1.json": ("compact", [{
        "pairid": int, "reference": str, "caption": str, "img_set": {"id": int, "members": [str], "reference_rank": int}}]),
    "cirr/captions_ext/cap.ext.rc2.val.json": ("compact", [{
        "pairid": int, "reference": str, "target_hard": str, "caption_extend": {"0": str, "1": str, "2": str, "3": str}}]),
    "cirr/captions_ext/cap.ext.rc2.test1.json": ("compact", [{
        "pairid": int, "reference": str, "caption_extend": {"0": str, "1": str, "2": str, "3": str}}]),
    "cirr/image_splits/split.rc2.val.json": ("compact", Map(r"dev-\d+-\d+-img[01]", str)),
    "cirr/image_splits/split.rc2.test1.json": ("compact", Map(r"test1-\d+-\d+-img[01]", str)),
    "cirr/demo_files/test1_pred_ranks_{metric}.json": ("compact", Map(r"\d+", [str], {"version": str, "metric": str})),
    "circo/annotations/val.json": ("indent", [{
        "reference_img_id": int, "target_img_id": int, "relative_caption": str, "shared_concept": str,
        "gt_img_ids": [int], "id": int, "semantic_aspects": [str]}]),
    "circo/annotations/test.json": ("indent", [{"reference_img_id": int, "relative_caption": str,
                                                "shared_concept": str, "id": int}]),
    "circo/submission_examples/submission_{split}.json": ("compact", Map(r"\d+", [int])),
    "genecis/genecis/{task}.json": ("indent", [{"condition": str, "gallery": [IMAGE], "reference": IMAGE,
                                                "target": IMAGE}]),
}
FILLS = {"cat": ("dress", "shirt", "toptee"), "split": ("val", "test"), "metric": ("recall", "recall_subset"),
         "task": ("focus_object", "change_object")}


def _paths(pattern: str) -> list[str]:
    out = [pattern]
    for name, values in FILLS.items():
        slot = "{" + name + "}"
        out = [p.replace(slot, v) for p in out for v in values] if slot in pattern else out
    return out


def _mismatch(value, schema, where: str) -> str | None:
    """Where ``value`` departs from ``schema`` (None if it conforms)."""
    if isinstance(schema, type):
        ok = type(value) is schema  # exact: a bool is not an int, an int is not a float
        return None if ok else f"{where}: {type(value).__name__}, expected {schema.__name__}"
    if isinstance(schema, list):
        if not isinstance(value, list) or not value:
            return f"{where}: expected a non-empty list"
        return next((m for i, v in enumerate(value) if (m := _mismatch(v, schema[0], f"{where}[{i}]"))), None)
    if not isinstance(value, dict):
        return f"{where}: expected an object"
    if isinstance(schema, Map):
        head = list(value)[: len(schema.head)]
        if head != list(schema.head):
            return f"{where}: first keys {head}, expected {list(schema.head)}"
        for k, v in value.items():
            sub = schema.head.get(k, schema.value)
            if k not in schema.head and not schema.key.fullmatch(k):
                return f"{where}: key {k!r} does not match {schema.key.pattern}"
            if m := _mismatch(v, sub, f"{where}.{k}"):
                return m
        return None
    if list(value) != list(schema):
        return f"{where}: keys {list(value)}, expected {list(schema)} (in this order)"
    return next((m for k, v in value.items() if (m := _mismatch(v, schema[k], f"{where}.{k}"))), None)


def test_fixture_files_have_the_upstream_layout_and_schema(fixtures):
    expected = {p: spec for pattern, spec in SCHEMA.items() for p in _paths(pattern)}
    present = {p.relative_to(fixtures).as_posix() for p in fixtures.rglob("*.json")}
    assert present == set(expected)
    for rel, (fmt, schema) in expected.items():
        text = (fixtures / rel).read_text(encoding="utf-8")
        data = json.loads(text)
        assert _mismatch(data, schema, rel) is None
        # byte for byte the formatting upstream uses (no final newline either)
        assert text == json.dumps(data, indent=4 if fmt == "indent" else None), f"{rel}: expected {fmt} JSON"


def test_the_schema_check_catches_departures():
    schema = [{"pairid": int, "img_set": {"members": [str]}, "soft": Map(r"dev-\d+", float)}]
    good = [{"pairid": 1, "img_set": {"members": ["a"]}, "soft": {"dev-1": 1.0}}]
    assert _mismatch(good, schema, "f") is None
    assert "expected int" in _mismatch([{**good[0], "pairid": "1"}], schema, "f")
    assert "expected int" in _mismatch([{**good[0], "pairid": True}], schema, "f")
    assert "in this order" in _mismatch([{"img_set": good[0]["img_set"], "pairid": 1, "soft": {}}], schema, "f")
    assert "expected float" in _mismatch([{**good[0], "soft": {"dev-1": 1}}], schema, "f")
    assert "does not match" in _mismatch([{**good[0], "soft": {"test1-1": 1.0}}], schema, "f")
    assert "f[0].img_set.members" in _mismatch([{**good[0], "img_set": {"members": []}}], schema, "f")


def test_project_fixtures_are_what_generate_py_writes(tmp_path):
    here = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"
    spec = importlib.util.spec_from_file_location("generate_fixtures", here / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    written = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.json")}
    committed = {p.relative_to(here): p.read_bytes() for p in here.rglob("*.json")}
    assert written.keys() == committed.keys()
    assert [k for k in written if written[k] != committed[k]] == []  # re-run generate.py after editing it
