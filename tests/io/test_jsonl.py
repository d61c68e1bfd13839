"""JSONL reading errors name file:line:field; appending is exactly-once across crashes."""

import json

import pytest

from cirkit.errors import CirkitError, RecordError
from cirkit.io.jsonl import JsonlAppender, iter_complete, read_records, write_jsonl
from cirkit.records import Caption, Query, Triplet


def _write(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
    return path


def test_reads_valid_records_and_keeps_extra_fields(tmp_path):
    p = _write(tmp_path / "c.jsonl", [json.dumps({"id": "a", "image": "a.png", "caption": "x", "shop": "s1"}), ""])
    (rec,) = read_records(p, Caption)
    assert rec.caption == "x" and rec.extra == {"shop": "s1"}
    assert rec.to_dict()["shop"] == "s1"


def test_malformed_json_names_file_and_line(tmp_path):
    p = _write(tmp_path / "c.jsonl", [json.dumps({"id": "a", "image": "a.png", "caption": "x"}), '{"id": "b",'])
    with pytest.raises(RecordError) as e:
        read_records(p, Caption)
    assert str(e.value).startswith(f"{p}:2: malformed JSON")


def test_missing_field_names_the_field(tmp_path):
    p = _write(tmp_path / "t.jsonl", [json.dumps({"id": "a", "reference": "r.png", "target": "t.png"})])
    with pytest.raises(RecordError, match=r"t.jsonl:1: field 'instruction': missing"):
        read_records(p, Triplet)


def test_wrong_type_names_the_field_and_value(tmp_path):
    p = _write(tmp_path / "q.jsonl", [json.dumps({"id": "q1", "reference": "r.png", "text": "x", "targets": "g1"})])
    with pytest.raises(RecordError, match=r"q.jsonl:1: field 'targets': expected list\[str\], got str"):
        read_records(p, Query)


def test_non_utf8_bytes(tmp_path):
    p = _write(tmp_path / "c.jsonl", [b'{"id": "a", "image": "a.png", "caption": "caf\xe9"}\n'])
    with pytest.raises(RecordError, match=r"c.jsonl:1: not valid UTF-8"):
        read_records(p, Caption)


def test_not_an_object(tmp_path):
    p = _write(tmp_path / "c.jsonl", ["[1, 2]"])
    with pytest.raises(RecordError, match="expected a JSON object"):
        read_records(p, Caption)


def test_duplicate_ids_are_reported_with_both_lines(tmp_path):
    rec = json.dumps({"id": "a", "image": "a.png", "caption": "x"})
    p = _write(tmp_path / "c.jsonl", [rec, rec])
    with pytest.raises(RecordError, match=r"c.jsonl:2: field 'id': duplicate id 'a' \(first on line 1\)"):
        read_records(p, Caption)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(CirkitError, match="no such file"):
        read_records(tmp_path / "none.jsonl", Caption)


def test_appender_resumes_skips_done_ids_and_repairs_torn_line(tmp_path):
    p = tmp_path / "out.jsonl"
    with JsonlAppender(p) as w:
        assert w.write({"id": "a", "v": 1})
        assert w.write({"id": "b", "v": 2})
    # simulate a crash in the middle of writing record c
    with open(p, "ab") as fh:
        fh.write(b'{"id": "c", "v"')
    with JsonlAppender(p) as w:
        assert "a" in w and "b" in w and "c" not in w
        assert not w.write({"id": "a", "v": 1})
        assert w.write({"id": "c", "v": 3})
    lines = p.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c"]


def test_appender_refuses_to_resume_a_corrupt_middle_line(tmp_path):
    p = _write(tmp_path / "out.jsonl", ['{"id": "a"}', "garbage", '{"id": "b"}'])
    with pytest.raises(RecordError, match=r"out.jsonl:2: malformed line"):
        JsonlAppender(p)


def test_iter_complete_ignores_the_torn_tail(tmp_path):
    p = _write(tmp_path / "out.jsonl", ['{"id": "a"}', "", "[1, 2]", b'{"id": "b", "v'])
    assert list(iter_complete(p)) == [(1, {"id": "a"}), (3, [1, 2])]
    assert list(iter_complete(_write(tmp_path / "torn.jsonl", [b'{"id": "x", "ima']))) == []
    assert list(iter_complete(tmp_path / "not-yet.jsonl")) == []


def test_iter_complete_malformed_complete_line_raises_or_is_skipped(tmp_path):
    p = _write(tmp_path / "out.jsonl", ['{"id": "a"}', '{"id": "b",', b'caf\xe9\n', '{"id": "c"}'])
    with pytest.raises(RecordError, match=r"out.jsonl:2: malformed JSON .* at column 12\)"):
        list(iter_complete(p))
    assert [obj["id"] for _, obj in iter_complete(p, skip_malformed=True)] == ["a", "c"]


def test_appender_cuts_a_torn_first_line_and_a_long_torn_tail(tmp_path):
    p = _write(tmp_path / "out.jsonl", [b'{"id": "a", "v'])
    with JsonlAppender(p) as w:
        assert not w.done and w.write({"id": "a"})
    assert p.read_text() == '{"id": "a"}\n'
    with open(p, "ab") as fh:  # a torn record longer than one backward-scan chunk
        fh.write(b'{"id": "b", "v": "' + b"x" * 200_000)
    with JsonlAppender(p) as w:
        assert w.done == {"a"}
    assert p.read_text() == '{"id": "a"}\n'


def test_write_jsonl_is_atomic_and_complete(tmp_path):
    p = tmp_path / "g.jsonl"
    n = write_jsonl(p, [Caption(id=str(i), image=f"{i}.png", caption="c") for i in range(5)])
    assert n == 5 and len(read_records(p, Caption)) == 5
    assert not [x for x in tmp_path.iterdir() if x.name.endswith(".tmp")]
