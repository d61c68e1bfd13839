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
