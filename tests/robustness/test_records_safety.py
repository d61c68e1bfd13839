"""Every kind of JSONL line a user (or a crash) can produce: refused with one line naming file:line(:field),
or accepted on purpose. Each row runs through the reader and through a real stage (`reformulate`,
which reads captions before it loads anything), whose output must stay untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cirkit.errors import RecordError
from cirkit.io import jsonl
from cirkit.io.jsonl import JsonlAppender, iter_complete, read_jsonl, read_records
from cirkit.records import Caption

from .conftest import fails, ok

GOOD = b'{"id": "a", "image": "a.png", "caption": "a red square"}\n'


def _cap(extra: bytes) -> bytes:
    return b'{"id": "b", "image": "b.png", "caption": "a blue circle"' + extra + b"}\n"


# name -> (line 2 of the file, what the one-line error says after "file:2: ")
REFUSED = {
    "malformed": (b'{"id": "b", "image": \n', "malformed JSON (Expecting value at column 22)"),
    "not_utf8": (b'{"id": "b", "image": "caf\xe9.png", "caption": "x"}\n', "not valid UTF-8 (byte 25)"),
    "a_list": (b"[1, 2]\n", "expected a JSON object, got a list"),
    "a_string": (b'"just text"\n', "expected a JSON object, got a string"),
    "null": (b"null\n", "expected a JSON object, got null"),
    "a_number": (b"12\n", "expected a JSON object, got a number"),
    "nesting_100k": (_cap(b', "x": ' + b"[" * 100_000 + b"]" * 100_000), "nested more than 100 levels deep"),
    "nesting_150": (_cap(b', "x": ' + b"[" * 150 + b"]" * 150), "field 'x': nested more than 100 levels deep"),
    "int_5000_digits": (_cap(b', "n": ' + b"7" * 5000), "an integer has more than 4300 digits"),
    "nan": (_cap(b', "score": NaN'), "NaN is not valid JSON"),
    "infinity": (_cap(b', "score": Infinity'), "Infinity is not valid JSON"),
    "minus_infinity": (_cap(b', "score": -Infinity'), "-Infinity is not valid JSON"),
    "float_overflow": (_cap(b', "score": 1e999'), "the number 1e999 is out of range for a 64-bit float"),
    "nul_escape": (b'{"id": "b", "image": "b.png", "caption": "a\\u0000b"}\n', "field 'caption': contains a NUL"),
    "nul_in_nested": (_cap(b', "meta": {"k": ["x\\u0000"]}'), "field 'meta': contains a NUL"),
    "nul_raw_byte": (b'{"id": "b", "image": "b.png", "caption": "a\x00b"}\n', "malformed JSON (Invalid control"),
    "lone_high_surrogate": (b'{"id": "b", "image": "b.png", "caption": "\\ud83d"}\n',
                            "field 'caption': contains a lone surrogate (\\ud83d)"),
    "lone_low_surrogate": (_cap(b', "tags": ["\\udc00x"]'), "field 'tags': contains a lone surrogate (\\udc00)"),
    "surrogate_key": (_cap(b', "\\udce9": 1'), "field '\\udce9': contains a lone surrogate"),
    "duplicate_key": (b'{"id": "b", "image": "b.png", "caption": "x", "id": "c"}\n', "field 'id': appears twice"),
    "duplicate_id": (GOOD, "field 'id': duplicate id 'a' (first on line 1)"),
    "bom_then_garbage": (b"\xef\xbb\xbf{oops}\n", "malformed JSON"),
}

# name -> (line 2, the ids read): accepted deliberately
ACCEPTED = {
    "crlf": (_cap(b"")[:-1] + b"\r\n", ["a", "b"]),
    "bom_mid_file": (b"\xef\xbb\xbf" + _cap(b""), ["a", "b"]),  # two Windows files concatenated
    "blank_and_spaces": (b"\n   \r\n\t\n", ["a"]),
    "surrogate_pair": (b'{"id": "b", "image": "b.png", "caption": "\\ud83d\\ude00 smile"}\n', ["a", "b"]),
    "utf8_text": ('{"id": "b", "image": "b.png", "caption": "café 東京 🙂"}\n'.encode(), ["a", "b"]),
    "escaped_backslash_u0000": (b'{"id": "b", "image": "b.png", "caption": "C:\\\\u0000"}\n', ["a", "b"]),
    "nesting_99": (_cap(b', "x": ' + b"[" * 99 + b"]" * 99), ["a", "b"]),
    "int_4300_digits": (_cap(b', "n": ' + b"7" * 4300), ["a", "b"]),
    "float_max": (_cap(b', "score": 1.7976931348623157e308'), ["a", "b"]),
    "no_final_newline": (_cap(b"")[:-1], ["a", "b"]),
}


def _file(tmp_path: Path, line2: bytes, first: bytes = GOOD) -> Path:
    path = tmp_path / "data" / "captions.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(first + line2)
    return path


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_reader_refuses_with_file_line_and_field(tmp_path, name):
    line, want = REFUSED[name]
    path = _file(tmp_path, line)
    with pytest.raises(RecordError) as e:
        read_records(path, Caption)
    assert str(e.value) == f"{path}:2: {want}" or str(e.value).startswith(f"{path}:2: {want}")
    assert "\n" not in str(e.value) and str(e.value).isprintable()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_stage_refuses_with_one_line_and_writes_nothing(tmp_path, name):
    line, want = REFUSED[name]
    path = _file(tmp_path, line)
    out = tmp_path / "out" / "triplets.jsonl"
    error = fails(["reformulate", str(path), "-g", "template", "-o", str(out)])
    assert error.startswith(f"error: {path}:2: {want}"), error
    assert not out.exists()


# (a repeated id in an output is kept and counted instead: test_jsonl's duplicates test)
@pytest.mark.parametrize("name", sorted(set(REFUSED) - {"duplicate_id"}))
def test_resuming_an_output_with_the_bad_line_is_refused_and_leaves_it(tmp_path, name):
    line, want = REFUSED[name]
    if want.startswith("expected a JSON object"):
        want = "expected a JSON object with an 'id'"
    out = tmp_path / "out.jsonl"
    out.write_bytes(GOOD + line + GOOD.replace(b'"a"', b'"c"'))
    before = out.read_bytes()
    with pytest.raises(RecordError) as e:
        JsonlAppender(out)
    assert str(e.value).startswith(f"{out}:2: malformed line in an output being resumed ({want}")
    assert out.read_bytes() == before


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_on_purpose(tmp_path, name):
    line, ids = ACCEPTED[name]
    path = _file(tmp_path, line)
    assert [r.id for r in read_records(path, Caption)] == ids
    out = tmp_path / "out" / "triplets.jsonl"
    if len(ids) > 1:
        summary = ok(["reformulate", str(path), "-g", "template", "-o", str(out), "-n", "2"])
        assert summary["counts"]["pairs"] == 2


def test_bom_at_the_start_of_the_file_is_accepted(tmp_path):
    path = _file(tmp_path, _cap(b""), first=b"\xef\xbb\xbf" + GOOD)
    assert [r.id for r in read_records(path, Caption)] == ["a", "b"]


def test_utf16_file_says_save_as_utf8(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(GOOD.decode().encode("utf-16"))
    line = fails(["reformulate", str(path), "-g", "template", "-o", str(tmp_path / "t.jsonl")])
    assert line == f"error: {path}:1: the file is UTF-16 text; save it as UTF-8"


def test_overlong_line_names_the_limit_without_reading_it_whole(tmp_path, monkeypatch):
    reads: list[int] = []
    path = _file(tmp_path, b'{"id": "b", "caption": "' + b"x" * 5000 + b'"}\n' + GOOD.replace(b'"a"', b'"c"'))
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1000)
    real = jsonl._lines

    def spy(fh):
        for lineno, raw, end in real(fh):
            reads.append(len(raw or b""))
            yield lineno, raw, end

    monkeypatch.setattr(jsonl, "_lines", spy)
    with pytest.raises(RecordError, match=r"captions.jsonl:2: line longer than 0 MiB \(1000 bytes\), the limit"):
        list(read_jsonl(path))
    assert max(reads) <= 1001
    error = fails(["reformulate", str(path), "-g", "template", "-o", str(tmp_path / "t.jsonl")])
    assert error.startswith(f"error: {path}:2: line longer than")


def test_overlong_line_at_the_real_16_mib_limit(tmp_path):
    path = _file(tmp_path, b'{"id": "b", "caption": "' + b"x" * (16 * 2**20) + b'"}\n')
    with pytest.raises(RecordError, match=r":2: line longer than 16 MiB \(16777216 bytes\)"):
        list(read_jsonl(path))


def test_an_overlong_torn_tail_is_cut_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1000)
    out = tmp_path / "out.jsonl"
    out.write_bytes(GOOD + b'{"id": "b", "caption": "' + b"x" * 5000)
    assert [obj["id"] for _, obj in iter_complete(out)] == ["a"]
    with JsonlAppender(out) as w:
        assert w.done == {"a"}
    assert out.read_bytes() == GOOD


def test_import_json_and_csv_follow_the_same_rules(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    deep = tmp_path / "deep.json"
    deep.write_text('[{"image": "a.png", "caption": ' + "[" * 100_000 + "]" * 100_000 + "}]")
    error = fails(["caption", "--from", str(deep), "-o", str(tmp_path / "c.jsonl")])
    assert error == f"error: {deep}: nested more than 100 levels deep"
    nan = tmp_path / "nan.json"
    nan.write_text('{"a.png": NaN}')
    assert fails(["caption", "--from", str(nan), "-o", str(tmp_path / "c.jsonl")]).startswith(
        f"error: {nan}: NaN is not valid JSON")
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps([{"image": "a.png", "caption": {"text": "x"}}]))
    assert fails(["caption", "--from", str(typed), "-o", str(tmp_path / "c.jsonl")]) == (
        f"error: {typed} item 0: field 'caption': expected a string, got {{'text': 'x'}}")
    csv_nul = tmp_path / "c.csv"
    csv_nul.write_bytes(b"image,caption\na.png,a\x00b\n")
    assert fails(["caption", "--from", str(csv_nul), "-o", str(tmp_path / "c.jsonl")]).startswith(
        f"error: {csv_nul}:2: field 'caption': contains a NUL")
    csv_latin = tmp_path / "l.csv"
    csv_latin.write_bytes(b"image,caption\na.png,caf\xe9\n")
    assert "not valid UTF-8" in fails(["caption", "--from", str(csv_latin), "-o", str(tmp_path / "c.jsonl")])
    assert not (tmp_path / "c.jsonl").exists()
