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


# -- a last line without its line break: a complete record is kept, a torn one cut ------------------


def test_appender_keeps_a_complete_last_record_that_lacks_its_newline(tmp_path):
    p = _write(tmp_path / "out.jsonl", ['{"id": "a"}', b'{"id": "b", "v": 2}'])  # as a user's editor saves it
    with JsonlAppender(p) as w:
        assert w.done == {"a", "b"}
        assert not w.write({"id": "b", "v": 2})
        assert w.write({"id": "c"})
    assert [json.loads(x) for x in p.read_text().splitlines()] == [{"id": "a"}, {"id": "b", "v": 2}, {"id": "c"}]


def test_iter_complete_yields_a_complete_unterminated_last_line(tmp_path):
    p = _write(tmp_path / "out.jsonl", ['{"id": "a"}', b'{"id": "b"}'])
    assert [obj["id"] for _, obj in iter_complete(p)] == ["a", "b"]


@pytest.mark.parametrize("tail", [b'{"id": "b"}\r', b"  ", b'{"id": "b"}  '])
def test_appender_terminates_a_complete_tail_with_crlf_or_spaces(tmp_path, tail):
    p = _write(tmp_path / "out.jsonl", [b'{"id": "a"}\r\n', tail])
    with JsonlAppender(p) as w:
        w.write({"id": "c"})
    assert p.read_bytes() == b'{"id": "a"}\r\n' + tail + b'\n{"id": "c"}\n'
    assert [obj.get("id") for _, obj in iter_complete(p)] == ["a", "b", "c"] if tail.strip() else ["a", "c"]


def test_appender_refuses_to_cut_an_incomplete_last_line_that_is_no_record(tmp_path):
    p = _write(tmp_path / "out.jsonl", ['{"id": "a"}', b"a note the user typed"])
    with pytest.raises(RecordError, match=r"out.jsonl: the last line is incomplete and is not a record"):
        JsonlAppender(p)
    assert p.read_bytes().endswith(b"a note the user typed")


def test_appender_warns_when_it_cuts_a_torn_tail(tmp_path, caplog):
    p = _write(tmp_path / "out.jsonl", ['{"id": "a"}', b'{"id": "b", "v'])
    with caplog.at_level("WARNING", logger="cirkit"), JsonlAppender(p):
        pass
    assert "cut a torn last line (14 bytes)" in caplog.text


def test_appender_resumes_a_file_with_a_bom_and_crlf(tmp_path):
    p = _write(tmp_path / "out.jsonl", [b'\xef\xbb\xbf{"id": "a"}\r\n{"id": "b"}\r\n'])
    with JsonlAppender(p) as w:
        assert w.done == {"a", "b"}
    assert [r["id"] for _, r in iter_complete(p)] == ["a", "b"]


def test_appender_counts_ids_repeated_in_an_existing_output(tmp_path, caplog):
    p = _write(tmp_path / "out.jsonl", ['{"id": "a"}', '{"id": "b"}', '{"id": "a"}'])
    with caplog.at_level("WARNING", logger="cirkit"), JsonlAppender(p) as w:
        assert w.duplicates == [("a", 3)]
    assert "1 records repeat an id" in caplog.text and "line 3" in caplog.text


# -- writing: what JSON or UTF-8 cannot hold is refused, a full disk is one line ------------------


@pytest.mark.parametrize("value,why", [("caf\udce9", "not Unicode"), (float("nan"), "cannot be written as JSON")])
def test_appender_refuses_values_it_cannot_write_and_writes_nothing(tmp_path, value, why):
    p = tmp_path / "out.jsonl"
    with JsonlAppender(p) as w:
        with pytest.raises(RecordError, match=why):
            w.write({"id": "a", "caption": value})
        assert "a" not in w and w.written == 0
    assert p.read_bytes() == b""


def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, monkeypatch):
    import errno
    import os

    p = tmp_path / "out.jsonl"
    with JsonlAppender(p) as w:
        w.write({"id": "a"})

        def full(fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(CirkitError, match=r"out.jsonl: cannot append \(No space left on device\); the 1 records"):
            w.write({"id": "b"})
    monkeypatch.undo()
    assert p.read_text() == '{"id": "a"}\n'


def test_appender_on_a_folder_or_under_a_file_is_one_line(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(CirkitError, match="is a folder, but a file is written here"):
        JsonlAppender(tmp_path / "dir.jsonl")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CirkitError, match="is a file, not a folder"):
        JsonlAppender(tmp_path / "file" / "out.jsonl")


def test_reading_a_folder_is_one_line(tmp_path):
    with pytest.raises(CirkitError, match="is a folder; give a JSONL file"):
        read_records(tmp_path, Caption)
