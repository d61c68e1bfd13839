"""Record schemas: required fields, types, path resolution."""

import pytest

from cirkit.errors import RecordError
from cirkit.records import Caption, EmbeddingManifest, Query, Triplet, resolve_path


def test_query_needs_image_or_text():
    with pytest.raises(RecordError, match="needs a reference image, a text, or both"):
        Query.from_dict({"id": "q"}, "q.jsonl", 3)
    assert Query.from_dict({"id": "q", "text": "a red circle"}).reference is None


def test_empty_instruction_rejected():
    with pytest.raises(RecordError, match="field 'instruction': must not be empty"):
        Triplet.from_dict({"id": "t", "reference": "a", "target": "b", "instruction": "  "}, "t.jsonl", 1)


def test_bool_is_not_an_int():
    with pytest.raises(RecordError, match="field 'dim'"):
        EmbeddingManifest.from_dict({"backbone": "fake", "checkpoint": "x", "dim": True})


def test_roundtrip_drops_unset_optionals_keeps_required():
    c = Caption(id="a", image="a.png", caption="x")
    d = c.to_dict()
    assert d == {"id": "a", "image": "a.png", "caption": "x", "model": "unknown"}
    assert Caption.from_dict(d) == c


def test_paths_resolve_relative_to_the_jsonl_folder(tmp_path):
    assert resolve_path("img/a.png", tmp_path / "data") == tmp_path / "data" / "img" / "a.png"
    assert resolve_path("/abs/a.png", tmp_path) == tmp_path.anchor / __import__("pathlib").Path("abs/a.png")


def test_triplet_ids_cannot_collide():
    import itertools

    from cirkit.records import triplet_id

    # the case: a + b__c and a__b + c were both "a__b__c"
    assert triplet_id("a", "b__c") != triplet_id("a__b", "c")
    assert triplet_id("a", "b__c") == "a__b%5F%5Fc" and triplet_id("a__b", "c") == "a%5F%5Fb__c"
    # every pair of ids over an alphabet that stresses the separator and the escape
    parts = ["".join(t) for n in range(4) for t in itertools.product("a_%5F", repeat=n)]
    seen: dict[str, tuple[str, str]] = {}
    for pair in itertools.product(parts, repeat=2):
        tid = triplet_id(*pair)
        assert seen.setdefault(tid, pair) == pair, (tid, seen[tid], pair)
        assert tid.count("__") == 1 and "___" not in tid


def test_triplet_ids_stay_readable():
    from cirkit.records import triplet_id

    assert triplet_id("shoes/im_001", "shoes/im_002") == "shoes/im_001__shoes/im_002"
    assert triplet_id("q-1", "7") == "q-1__7"
    assert triplet_id("_x", "y_") == "%5Fx__y%5F" and triplet_id("50%", "a") == "50%25__a"


def test_unknown_fields_are_kept_when_a_record_is_written_back(tmp_path):
    """README: 'Unknown fields of a record are kept when cirkit writes it back' (here: caption --from)."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from cirkit.cli import app
    from cirkit.records import Caption

    rec = Caption.from_dict({"id": "a", "image": "a.png", "caption": "x", "photographer": "me", "tags": ["t"]})
    assert rec.to_dict()["photographer"] == "me" and rec.to_dict()["tags"] == ["t"]
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "mine.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "caption": "a red square",
                                                     "photographer": "me"}) + "\n")
    res = CliRunner().invoke(app, ["caption", "--from", str(tmp_path / "mine.jsonl"), "-o", str(tmp_path / "c.jsonl")])
    assert res.exit_code == 0, res.stderr
    assert json.loads((tmp_path / "c.jsonl").read_text())["photographer"] == "me"
