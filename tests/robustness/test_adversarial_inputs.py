"""The adversarial table of bad inputs: every stage, every input kind, every setting.

Each case runs the real CLI in process and must end with exit 1 (2 for usage errors), exactly
one ``error:`` line naming the file, record, field or flag (and a fix), no traceback, and every
file that existed before (the shared ``world`` and the case's own folder) byte-identical after.
The classes are issue 12's: numbers out of range (every int and float setting of every stage,
from its config dataclass, so a new setting is covered without an edit), recipes (bombs,
recursion, control characters, devices, wrong types), JSONL records Python or JSON cannot hold
(per stage input), damaged checkpoints and Lance stores, images that are bombs in every format,
and environment variables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import ok, refused

pytest.importorskip("torch")

STAGES = {  # command -> config dataclass
    "synth": "cirkit.synth.SynthConfig",
    "caption": "cirkit.caption.CaptionConfig",
    "reformulate": "cirkit.reformulate.ReformulateConfig",
    "train": "cirkit.train.config.TrainConfig",
    "embed": "cirkit.embed.EmbedConfig",
    "index": "cirkit.index.IndexConfig",
    "query": "cirkit.query.QueryConfig",
    "evaluate": "cirkit.evaluate.EvaluateConfig",
}


def _numeric_settings() -> list[tuple[str, str, str, type]]:
    """(stage, flag, field, int|float) of every numeric CLI setting of every stage."""
    from cirkit.cli._common import config_class
    from cirkit.config import flag_name, spec

    out = []
    for stage, path in STAGES.items():
        cls = config_class(path)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            s = spec(f)
            if not s.cli or s.positional or s.choices:
                continue
            args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
            kind = next((a for a in args if a in (int, float)), None)
            if kind is not None and len(args) == 1:
                out.append((stage, flag_name(f), f.name, kind))
    return out


NUMERIC = _numeric_settings()


def test_the_numeric_table_covers_every_stage():
    assert {s for s, *_ in NUMERIC} == set(STAGES)
    assert len(NUMERIC) >= 40, len(NUMERIC)


# -- numbers: too big, not finite, negative ------------------------------------------------------
def _too_big(kind: type) -> str:
    return str(2**63) if kind is int else "inf"


@pytest.mark.parametrize("stage, flag, name, kind", NUMERIC, ids=[f"{s}{f}" for s, f, *_ in NUMERIC])
def test_a_huge_or_infinite_number_is_one_line_before_any_work(tmp_path, stage, flag, name, kind):
    line = refused([stage, flag, _too_big(kind)], [tmp_path], cwd=tmp_path)
    assert line.startswith(f"error: {flag} must be ")
    assert ("at most" in line or "between" in line or "less than" in line) if kind is int else "finite" in line


@pytest.mark.parametrize("stage, flag, name, kind", [c for c in NUMERIC if c[3] is float],
                         ids=[f"{s}{f}" for s, f, _, k in NUMERIC if k is float])
def test_nan_is_one_line(tmp_path, stage, flag, name, kind):
    line = refused([stage, flag, "nan"], [tmp_path], cwd=tmp_path)
    assert line == f"error: {flag} must be a number, got nan"


def _lower_bound(stage: str, name: str) -> float | None:
    from cirkit.cli._common import config_class
    from cirkit.config import spec

    f = next(f for f in dataclasses.fields(config_class(STAGES[stage])) if f.name == name)
    s = spec(f)
    return s.ge if s.ge is not None else s.gt


NEGATIVE = [c for c in NUMERIC if (_lower_bound(c[0], c[2]) or -1) >= 0]


@pytest.mark.parametrize("stage, flag, name, kind", NEGATIVE, ids=[f"{s}{f}" for s, f, *_ in NEGATIVE])
def test_a_negative_count_or_rate_is_one_line(tmp_path, stage, flag, name, kind):
    line = refused([stage, flag, "-1"], [tmp_path], cwd=tmp_path)
    assert line.startswith(f"error: {flag} must be ") and "got -1" in line


@pytest.mark.parametrize("value", [f"{2**63}", "1e400", ".inf", "-.inf", ".nan"])
def test_numbers_from_a_recipe_too(tmp_path, value):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"embed:\n  batch_size: {value}\n")
    line = refused(["embed", "-c", str(recipe)], [tmp_path], cwd=tmp_path)
    assert line.startswith(f"error: {recipe}: ") and "batch_size" in line


def test_many_workers_start_no_more_processes_than_batches(world, tmp_path, monkeypatch):
    """256 workers for a few dozen images in batches of 64 would fork 256 processes for one or two batches."""
    import torch

    seen = []
    real = torch.utils.data.DataLoader.__init__

    def spy(self, *a, **k):
        seen.append(k.get("num_workers"))
        real(self, *a, **{**k, "num_workers": 0, "prefetch_factor": None})

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", spy)
    ok(["embed", str(world / "synth" / "images"), "--backbone", "fake", "-o", str(tmp_path / "g.lance"),
        "--num-workers", "256"])
    n = len(list((world / "synth" / "images").iterdir()))
    assert seen == [math.ceil(n / 64)]


# -- recipes ---------------------------------------------------------------------------------------
BOMB = "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9) if p else ', '.join(['x'] * 9)}]\n"
               for p, c in zip(["", "a", "b", "c", "d", "e", "f", "g"], "abcdefgh", strict=True))
RECIPES = {  # name -> (bytes, what the one line says after "error: <recipe>: ")
    "alias_bomb": (BOMB.encode(), "aliases expand to more than"),
    "self_alias": (b"k: &a [*a]\n", "an alias refers to the value that contains it"),
    "deep": (b"k: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    "nul_byte": (b"k: 3\x00\n", "invalid YAML"),
    "escape_char": (b"k: 3\x1b\n", "invalid YAML"),
    "over_1mb": (b"k: " + b"x" * 1_100_000 + b"\n", "larger than 1 MB"),
    "latin1": (b"where: 'caf\xe9'\n", "not UTF-8 text"),
    "utf16": ("k: 3\n".encode("utf-16"), "not UTF-8 text"),
    "python_tag": (b"k: !!python/object/apply:os.system ['touch PWNED']\n", "invalid YAML"),
    "not_a_mapping": (b"- k\n- 3\n", "a recipe must be a mapping"),
    "non_text_key": (b"1: 2\n", "setting names must be text"),
    "two_documents": (b"k: 1\n---\nk: 2\n", "invalid YAML"),
    "unknown_key": (b"kk: 3\n", "unknown setting 'kk'"),
    "list_for_int": (b"k: [1, 2]\n", "setting 'k' expects int"),
    "text_for_int": (b"k: ten\n", "setting 'k' expects int"),
    "fraction_for_int": (b"k: 2.5\n", "setting 'k' expects int"),
    "date_for_int": (b"k: 2001-12-14\n", "setting 'k' expects int"),
    "binary_for_int": (b"k: !!binary aGVsbG8=\n", "setting 'k' expects int"),
    "quoted_false": (b"exclude_reference: 'false'\n", "expects true or false"),
    "number_for_bool": (b"exclude_reference: 0\n", "expects true or false"),
    "mapping_for_path": (b"html: {a: 1}\n", "expects a path"),
    "nul_in_path": (b'html: "a\\0b.html"\n', "contains a NUL character"),
    "nul_in_name": (b'index: "idx\\0"\n', "contains a NUL character"),
    "huge_k": (f"k: {2**70}\n".encode(), "k must be at most"),
    "infinite_k": (b"k: .inf\n", "setting 'k' expects int"),
    "unknown_mode": (b"mode: weird\n", "unknown query mode"),
    "unknown_search": (b"search: fast\n", "unknown search"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_bad_recipe_is_one_line_naming_it(world, tmp_path, name):
    data, want = RECIPES[name]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(data)
    image = next((world / "synth" / "images").iterdir())
    line = refused(["query", str(image), "red", "--index", str(world / "idx"), "-c", str(recipe)], [world, tmp_path],
                   cwd=tmp_path)
    assert want in line, line
    if name not in ("unknown_mode", "huge_k"):
        assert str(recipe) in line
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "fifo"])
def test_a_recipe_that_is_not_a_regular_file(tmp_path, path):
    if path == "fifo":
        os.mkfifo(tmp_path / "fifo")
        path = str(tmp_path / "fifo")
    line = refused(["embed", "-c", path], [tmp_path], cwd=tmp_path)  # a FIFO must not hang the run
    assert line == f"error: {path}: a recipe must be a regular YAML file, not a device, FIFO or socket"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_reads_its_recipe_section_under_the_same_rules(tmp_path, stage):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{stage}:\n  a: &a [*a]\n")
    line = refused([stage, "-c", str(recipe)], [tmp_path], cwd=tmp_path)
    assert line.startswith(f"error: {recipe}: an alias refers to the value that contains it")


@pytest.mark.parametrize("table", ["../victim", "/tmp/victim", "a/b", "..", ".", ".hidden", "a\\b", "x" * 300,
                                   "ｖｉｃｔｉｍ", "a b", "victim\u202e", "-rf"])
def test_a_table_name_that_would_become_a_path_is_refused(world, tmp_path, table):
    (tmp_path / "victim.lance").mkdir()
    (tmp_path / "victim.lance" / "keep").write_text("mine")
    for args in (["index", str(world / "g.lance"), "-o", str(tmp_path / "idx"), "--table", table],
                 ["query", "--text", "red", "--index", str(world / "idx"), "--table", table]):
        line = refused(args, [world, tmp_path], cwd=tmp_path)
        assert "is not a plain name" in line
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"index": {"table": table}}))
    line = refused(["index", str(world / "g.lance"), "-o", str(tmp_path / "idx"), "-c", str(recipe)], [world],
                   cwd=tmp_path)
    assert "is not a plain name" in line


# -- JSONL records, per stage input ---------------------------------------------------------------
def _line(obj_bytes: bytes) -> bytes:
    return obj_bytes + b"\n"


BAD_VALUES = {  # name -> (a JSON value as bytes, what the error says)
    "deep_nesting": (b"[" * 100_000 + b"]" * 100_000, "nested more than 100 levels deep"),
    "int_5000_digits": (b"7" * 5000, "more than 4300 digits"),
    "nul": (b'"a\\u0000b"', "contains a NUL"),
    "lone_surrogate": (b'"\\ud800"', "lone surrogate"),
    "nan": (b"NaN", "NaN is not valid JSON"),
    "overflowing_float": (b"1e999", "out of range"),
}


def _records(world: Path) -> dict[str, tuple[str, dict]]:
    """stage input -> (file name, one good record) with image paths valid from the case folder."""
    img = str(next((world / "synth" / "images").iterdir()))
    return {
        "caption-input": ("gallery.jsonl", {"id": "a", "image": img}),
        "caption-from": ("captions.jsonl", {"id": "a", "image": img, "caption": "a red square"}),
        "reformulate": ("captions.jsonl", {"id": "a", "image": img, "caption": "a red square"}),
        "train": ("captions.jsonl", {"id": "a", "image": img, "caption": "a red square"}),
        "embed": ("gallery.jsonl", {"id": "a", "image": img}),
        "index-metadata": ("meta.jsonl", {"id": "a", "colour": "red"}),
        "query-batch": ("queries.jsonl", {"id": "q", "reference": img, "text": "red", "targets": ["a"]}),
        "evaluate-queries": ("queries.jsonl", {"id": "q", "reference": img, "text": "red", "targets": ["a"]}),
    }


def _args(use: str, world: Path, path: Path, out: Path) -> list[str]:
    return {
        "caption-input": ["caption", str(path), "-o", str(out / "c.jsonl"), "-m", "no/model"],
        "caption-from": ["caption", "--from", str(path), "-o", str(out / "c.jsonl")],
        "reformulate": ["reformulate", str(path), "-g", "template", "-o", str(out / "t.jsonl")],
        "train": ["train", str(path), "--stage", "1", "-m", "cirkit-tiny", "-o", str(out / "run"), "--max-steps", "1",
                  "--num-workers", "0"],
        "embed": ["embed", str(path), "--backbone", "fake", "-o", str(out / "g.lance"), "--num-workers", "0"],
        "index-metadata": ["index", str(world / "g.lance"), "-o", str(out / "idx"), "--metadata", str(path)],
        "query-batch": ["query", "--batch", str(path), "--index", str(world / "idx"), "-o", str(out / "r.jsonl")],
        "evaluate-queries": ["evaluate", "generic", "-d", str(path.parent), "--backbone", "fake", "--num-workers", "0",
                             "-o", str(out / "m.json")],
    }[use]


JSONL_CASES = [(use, bad) for use in ("caption-input", "caption-from", "reformulate", "train", "embed",
                                      "index-metadata", "query-batch", "evaluate-queries") for bad in BAD_VALUES]


@pytest.mark.parametrize("use, bad", JSONL_CASES, ids=[f"{u}-{b}" for u, b in JSONL_CASES])
def test_a_record_python_or_json_cannot_hold_is_one_line_naming_file_and_line(world, tmp_path, use, bad):
    name, good = _records(world)[use]
    data = tmp_path / "data"
    data.mkdir()
    path = data / name
    value, want = BAD_VALUES[bad]
    second = json.dumps({**good, "id": "b"})[:-1].encode() + b', "extra": ' + value + b"}"
    path.write_bytes(_line(json.dumps(good).encode()) + _line(second))
    if use == "evaluate-queries":  # a generic benchmark: gallery.jsonl beside queries.jsonl
        (data / "gallery.jsonl").write_text(json.dumps({"id": "a", "image": good["reference"]}) + "\n")
    out = tmp_path / "out"
    line = refused(_args(use, world, path, out), [world, tmp_path], cwd=tmp_path)
    assert line.startswith(f"error: {path}:2: ") and want in line, line
    assert not out.exists() or not any(p for p in out.rglob("*") if not p.name.startswith("."))


@pytest.mark.parametrize("use", ["reformulate", "embed", "query-batch", "caption-from"])
def test_a_line_that_is_a_list_or_not_utf8_or_a_duplicate_id(world, tmp_path, use):
    name, good = _records(world)[use]
    for n, (second, want) in enumerate([(b"[1, 2]", "expected a JSON object"),
                                         (json.dumps(good).encode().replace(b'"a', b'"\xe9'), "not valid UTF-8"),
                                         (json.dumps(good).encode(), "duplicate")]):
        path = tmp_path / f"d{n}" / name
        path.parent.mkdir()
        path.write_bytes(_line(json.dumps(good).encode()) + _line(second))
        line = refused(_args(use, world, path, tmp_path / f"out{n}"), [world, tmp_path], cwd=tmp_path)
        assert line.startswith(f"error: {path}:2: ") and want in line, line


# -- checkpoints ---------------------------------------------------------------------------------------
def _ck(world: Path, tmp_path: Path, damage) -> Path:
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(world / "ck", ck)
    damage(ck)
    return ck


def _config(ck: Path, **changes) -> None:
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(changes)
    (ck / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not ...}))


CHECKPOINTS = {  # name -> (damage, what the one line says)
    "weights_truncated": (lambda ck: (ck / "model.safetensors").write_bytes(
        (ck / "model.safetensors").read_bytes()[:-999]), "truncated"),
    "weights_header_cut": (lambda ck: (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:99]),
                           "not a safetensors file"),
    "weights_empty": (lambda ck: (ck / "model.safetensors").write_bytes(b""), "not a safetensors file"),
    "weights_garbage_header": (lambda ck: (ck / "model.safetensors").write_bytes(struct.pack("<Q", 20) + b"{not json" + b" " * 20),
                               "not a safetensors file"),
    "weights_huge_header_length": (lambda ck: (ck / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}"),
                                   "not a safetensors file"),
    "weights_are_a_pickle": (lambda ck: (ck / "model.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64),
                             "not a safetensors file"),
    "weights_a_folder": (lambda ck: ((ck / "model.safetensors").unlink(), (ck / "model.safetensors").mkdir()),
                         "model.safetensors"),
    "config_missing_key": (lambda ck: _config(ck, model=...), "missing 'model'"),
    "config_wrong_type": (lambda ck: _config(ck, cross_attn="yes"), "'cross_attn' must be true or false"),
    "config_int_as_text": (lambda ck: _config(ck, cross_attn_layers=["1"]), "'cross_attn_layers' must be"),
    "config_weights_escape": (lambda ck: _config(ck, weights="../../etc/passwd"), "'weights' must be a file name"),
    "config_weights_absolute": (lambda ck: _config(ck, weights="/etc/passwd"), "'weights' must be a file name"),
    "config_other_backbone": (lambda ck: _config(ck, backbone="resnet"), "'backbone' must be one of"),
    "config_not_json": (lambda ck: (ck / "config.json").write_text("{'backbone': 'vit'}"), "not valid JSON"),
    "config_a_list": (lambda ck: (ck / "config.json").write_text("[1]"), "not a JSON object"),
    "config_nan": (lambda ck: (ck / "config.json").write_text(
        (ck / "config.json").read_text().replace('"temperature": 0.07', '"temperature": NaN')),
        "'temperature' must be a number"),
    "config_deep": (lambda ck: (ck / "config.json").write_text('{"cirkit": "1", "backbone": "vit", "model": "x", "a": '
                                                              + "[" * 50_000 + "]" * 50_000 + "}"), "config.json"),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_a_damaged_checkpoint_is_one_line_for_every_reader(world, tmp_path, name):
    damage, want = CHECKPOINTS[name]
    ck = _ck(world, tmp_path, damage)
    images = world / "synth" / "images"
    bench = world / "synth" / "benchmark" / "test"
    for args in (["embed", str(images), "--model", str(ck), "-o", str(tmp_path / "g.lance"), "--num-workers", "0"],
                 ["evaluate", "generic", "-d", str(bench), "-m", str(ck), "--num-workers", "0"],
                 ["train", str(world / "synth" / "triplets.jsonl"), "--stage", "2", "--init", str(ck), "-o",
                  str(tmp_path / "run"), "--max-steps", "1", "--num-workers", "0"]):
        line = refused(args, [world, tmp_path], cwd=tmp_path)
        assert str(ck) in line and want in line, (args[0], line)


# -- Lance stores --------------------------------------------------------------------------------------
def _store(tmp_path: Path, *, manifest=None, vectors=None, ids=None, schema_fn=None) -> Path:
    import lance
    import pyarrow as pa

    from cirkit.io.embeddings import MANIFEST_KEY

    ids = ids or ["a", "b"]
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.eye(len(ids), 4, dtype=np.float32).ravel()), 4) \
        if vectors is None else vectors
    meta = {MANIFEST_KEY: manifest if manifest is not None else json.dumps(
        {"backbone": "fake", "checkpoint": "fake", "dim": 4})}
    schema = pa.schema([pa.field("id", pa.string()), pa.field("image", pa.string()),
                        pa.field("vector", vec.type)], metadata=meta)
    if schema_fn:
        schema = schema_fn(schema)
    table = pa.table([pa.array(ids), pa.array([f"{i}.png" for i in ids]), vec], schema=schema)
    lance.write_dataset(table, str(tmp_path / "s.lance"))  # lance itself: lancedb refuses some damage on write
    return tmp_path / "s.lance"


def _null_vectors():
    import pyarrow as pa

    return pa.array([[1, 0, 0, 0], None], pa.list_(pa.float32(), 4))


STORES = {  # name -> (store kwargs, what the one line says)
    "manifest_not_json": ({"manifest": b"{not json"}, "manifest is not valid JSON"),
    "manifest_a_list": ({"manifest": b"[1]"}, "manifest"),
    "manifest_dim_zero": ({"manifest": json.dumps({"backbone": "fake", "checkpoint": "fake", "dim": 0})}, "dim 0"),
    "manifest_wrong_dim": ({"manifest": json.dumps({"backbone": "fake", "checkpoint": "fake", "dim": 8})},
                           "expected fixed_size_list<float>[8]"),
    "no_manifest": ({"schema_fn": lambda s: s.remove_metadata()}, "no cirkit manifest"),
    "null_vector": ({"vectors": _null_vectors()}, "has a null vector"),
    "duplicate_ids": ({"ids": ["a", "a"]}, "stored more than once"),
}


@pytest.mark.parametrize("name", sorted(STORES))
def test_a_damaged_store_is_one_line_for_index(tmp_path, name):
    kwargs, want = STORES[name]
    store = _store(tmp_path, **kwargs)
    line = refused(["index", str(store), "-o", str(tmp_path / "idx")], [tmp_path], cwd=tmp_path)
    assert str(store) in line and want in line, line


@pytest.mark.parametrize("name", ["a folder of user files", "a file", "uncommitted with user files"])
def test_a_store_path_that_is_not_a_store(world, tmp_path, name):
    store = tmp_path / "g.lance"
    if name == "a file":
        store.write_text("mine")
    else:
        store.mkdir()
        (store / "thesis.tex").write_text("years of work")
        if name.startswith("uncommitted"):
            (store / "_versions").mkdir()
    for args in (["embed", str(world / "synth" / "images"), "--backbone", "fake", "-o", str(store), "--num-workers",
                  "0"], ["index", str(store), "-o", str(tmp_path / "idx")]):
        line = refused(args, [world, tmp_path], cwd=tmp_path)
        assert str(store) in line


@pytest.mark.parametrize("value, want", [(2**63, "beyond 64 bits"), (-(2**63) - 1, "beyond 64 bits"),
                                         ({}, "'v'"), ([1, "a"], "mixed or wrong types")])
def test_metadata_lance_cannot_store_is_one_line(world, tmp_path, value, want):
    from cirkit.io.embeddings import read_embeddings

    x, y = read_embeddings(world / "g.lance")[1][:2]
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"id": x, "v": 1}) + "\n" + json.dumps({"id": y, "v": value}) + "\n")
    line = refused(["index", str(world / "g.lance"), "-o", str(tmp_path / "idx"), "--metadata", str(meta)],
                   [world, tmp_path], cwd=tmp_path)
    assert want in line and "'v'" in line


# -- images: bombs in every format, and formats cirkit does not decode ------------------------------
def _png(w: int, h: int) -> bytes:
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _patched(fmt: str, w: int, h: int) -> bytes:
    """A tiny real file of ``fmt`` whose header claims ``w`` x ``h``."""
    import io

    buf = io.BytesIO()
    Image.new("1" if fmt in ("TIFF", "BMP") else "RGB", (8, 8)).save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    if fmt == "GIF":  # logical screen and the first frame's descriptor
        data[6:10] = struct.pack("<HH", w, h)
        at = data.index(b",")
        data[at + 5:at + 9] = struct.pack("<HH", w, h)
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", w, h)
    elif fmt == "JPEG":
        at = data.index(b"\xff\xc0")
        data[at + 5:at + 9] = struct.pack(">HH", h, w)
    elif fmt == "TIFF":
        for tag, value in ((256, w), (257, h)):
            at = data.index(struct.pack("<H", tag), 8)
            kind = struct.unpack("<H", data[at + 2:at + 4])[0]
            data[at + 8:at + 12] = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
            data[at + 2:at + 4] = struct.pack("<H", 4)
    return bytes(data)


BOMBS = {  # name -> (file bytes, what the skip reason says)
    "png_100_megapixels": (lambda: _png(10_000, 10_000), "pixel limit"),
    "png_2000000x1": (lambda: _png(2_000_000, 1), "longest side"),
    "png_long_strip": (lambda: _png(20_000, 100), "aspect ratio"),
    "gif_65535_square": (lambda: _patched("GIF", 65_535, 65_535), "limit"),
    "bmp_50000_square": (lambda: _patched("BMP", 50_000, 50_000), "limit"),
    "jpeg_65500_square": (lambda: _patched("JPEG", 65_500, 65_500), "limit"),
    "tiff_30000_square": (lambda: _patched("TIFF", 30_000, 30_000), "limit"),
    "eps_named_png": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "PIL can identify"),
    "psd_named_png": (lambda: b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 30_000, 30_000, 8, 3),
                      "PIL can identify"),
    "ico_named_png": (lambda: _ico(), "PIL can identify"),
}


def _ico() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="ICO")
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_image_bombs_and_foreign_formats_are_refused_before_decoding(tmp_path, monkeypatch, name):
    from PIL import ImageFile

    make, want = BOMBS[name]
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16), "red").save(folder / "good.png")
    (folder / "bad.png").write_bytes(make())
    decoded: list[str] = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: (decoded.append(Path(self.filename or "?").name), real(self))[1])
    summary = ok(["embed", str(folder), "--backbone", "fake", "-o", str(tmp_path / "g.lance"), "--num-workers", "0"])
    assert summary["counts"]["embedded"] == 1 and summary["counts"]["failed"] == 1
    (skip,) = summary["skipped_items"]
    assert Path(skip["item"]).name == "bad.png" and want in skip["reason"], skip
    assert "bad.png" not in decoded
    line = refused(["embed", str(folder), "--backbone", "fake", "-o", str(tmp_path / "g2.lance"), "--num-workers", "0",
                    "--strict"], [tmp_path], cwd=tmp_path)
    assert f"{(folder / 'bad.png').resolve()}: " in line and want in line


def test_a_bomb_as_the_query_image_is_one_line(world, tmp_path):
    bomb = tmp_path / "q.png"
    bomb.write_bytes(_png(10_000, 10_000))
    line = refused(["query", str(bomb), "red", "--index", str(world / "idx")], [world, tmp_path], cwd=tmp_path)
    assert line.startswith(f"error: {bomb}: 10000x10000") and "pixel limit" in line


# -- environment variables -------------------------------------------------------------------------
@pytest.mark.parametrize("var, value", [("CIRKIT_CACHE_DIR", "/dev/null/x"), ("CUDA_VISIBLE_DEVICES", "garbage"),
                                        ("HF_HOME", "/dev/null"), ("OMP_NUM_THREADS", "lots"),
                                        ("CIRKIT_CHECK_SYNC", "maybe")])
def test_odd_environment_variables_do_not_break_a_stage(world, tmp_path, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    summary = ok(["index", str(world / "g.lance"), "-o", str(tmp_path / "idx")])
    assert summary["counts"]["added"] > 0
    image = next((world / "synth" / "images").iterdir())
    assert ok(["query", str(image), "red", "--index", str(tmp_path / "idx")])["counts"]["hits"] == 10


def test_every_numeric_flag_value_is_finite_in_json(world, tmp_path):
    """--json prints strict JSON whatever the numbers (no NaN/Infinity tokens)."""
    summary = ok(["evaluate", "generic", "-d", str(world / "synth" / "benchmark" / "test"), "--backbone", "fake",
                  "--num-workers", "0"])
    text = json.dumps(summary)
    assert "NaN" not in text and "Infinity" not in text
    assert all(math.isfinite(v) for v in summary["metrics"].values() if isinstance(v, float))


def test_usage_errors_exit_2_with_one_line(tmp_path):
    for args in (["embed", "--batch-size", "many"], ["query", "--k", "1e3"], ["train", "--lr", "fast"],
                 ["index", "--num-partitions", "1.5"], ["nope"], ["embed", "--nope"]):
        line = refused(args, [tmp_path], code=2, cwd=tmp_path)
        assert line.startswith("error: ") and "--help" in line
