"""Safety promises: safetensors only, no remote code by default, paths resolve and stay put.

Model hubs are never reached: the ``from_pretrained`` calls are replaced by probes that
record their keyword arguments and then fail, so each test sees exactly what cirkit
would have asked transformers for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from .conftest import fails, ok

pytest.importorskip("torch")


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything calls torch.load (the only way cirkit could unpickle weights)."""
    import torch

    def refuse(*a, **k):
        raise AssertionError(f"torch.load called on {a[:1]}")

    monkeypatch.setattr(torch, "load", refuse)


def _images(root: Path) -> Path:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "red").save(root / "imgs" / "a.png")
    return root / "imgs"


# -- safetensors only ------------------------------------------------------------------------
@pytest.mark.parametrize("allow", [False, True])
def test_vit_checkpoint_with_only_pickle_weights_is_refused(vit_checkpoint, tmp_path, no_unpickling, allow):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_bytes((vit_checkpoint / "config.json").read_bytes())
    (ck / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    line = fails(["embed", str(_images(tmp_path)), "--model", str(ck), "-o", str(tmp_path / "g.lance"),
                  *(["--allow-pickle"] if allow else [])])
    assert line == (f"error: {ck}: no model.safetensors, only pickle weights (pytorch_model.bin); "
                    "cirkit checkpoints load from safetensors only, never from pickle")


def test_mllm_folder_with_only_pickle_weights_needs_allow_pickle(tmp_path, monkeypatch, no_unpickling):
    import transformers

    model = tmp_path / "mllm"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04")
    args = ["embed", str(_images(tmp_path)), "--backbone", "mllm", "--model", str(model), "-o", str(tmp_path / "g.lance")]
    line = fails(args)
    assert line == f"error: {model}: only pickle (.bin) weights found; convert to safetensors or pass --allow-pickle"

    seen = []

    def probe(name, **kw):
        seen.append((name, kw))
        raise OSError("probe: not loading anything")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", probe)
    line = fails([*args, "--allow-pickle"])  # past the pickle check, into transformers (stubbed)
    assert seen == [(str(model), {"trust_remote_code": False})]
    assert "cannot load multimodal model" in line


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_open_clip_pickle_weights_are_refused_without_allow_pickle(tmp_path, no_unpickling, suffix):
    weights = tmp_path / f"weights{suffix}"
    weights.write_bytes(b"\x80\x04")
    line = fails(["embed", str(_images(tmp_path)), "--backbone", "clip", "--model", "cirkit-tiny",
                  "--pretrained", str(weights), "-o", str(tmp_path / "g.lance")])
    assert line == (f"error: {weights}: pickle checkpoints can run code when loaded; convert to .safetensors "
                    "or pass --allow-pickle if you trust the file")


# -- no remote code by default -----------------------------------------------------------------
def _caption_args(tmp_path):
    return ["caption", str(_images(tmp_path)), "-o", str(tmp_path / "c.jsonl"), "-m", "someone/model", "--device", "cpu"]


def _reformulate_args(tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": f"i{i}", "image": f"{i}.png", "caption": f"a {c} square"}) + "\n"
                                for i, c in enumerate(["red", "blue", "green"])))
    return ["reformulate", str(captions), "-o", str(tmp_path / "t.jsonl"), "-m", "someone/model", "--device", "cpu"]


def _embed_args(tmp_path):
    return ["embed", str(_images(tmp_path)), "--backbone", "mllm", "-m", "someone/model", "-o", str(tmp_path / "g.lance"),
            "--device", "cpu"]


LOADERS = {  # stage -> (args, the transformers class whose from_pretrained it calls first)
    "caption": (_caption_args, "AutoConfig"),
    "reformulate": (_reformulate_args, "AutoTokenizer"),
    "embed-mllm": (_embed_args, "AutoProcessor"),
}


@pytest.mark.parametrize("trust", [False, True], ids=["default", "flag"])
@pytest.mark.parametrize("stage", sorted(LOADERS))
def test_trust_remote_code_is_off_unless_asked(tmp_path, monkeypatch, stage, trust):
    import transformers

    seen = []

    def probe(name, **kw):
        seen.append(kw.get("trust_remote_code", "not passed"))
        raise OSError("probe: not loading anything")

    for cls in ("AutoConfig", "AutoTokenizer", "AutoProcessor", "AutoModelForCausalLM", "AutoModelForImageTextToText"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", probe)
    monkeypatch.setattr("cirkit.hub.check_model", lambda *a, **k: None)  # the hub would serve someone/model
    make_args, _ = LOADERS[stage]
    line = fails([*make_args(tmp_path), *(["--trust-remote-code"] if trust else [])])
    assert "someone/model" in line
    assert seen and all(v is trust for v in seen), seen


# -- paths -----------------------------------------------------------------------------------
def test_jsonl_image_paths_resolve_relative_to_the_jsonl_not_the_cwd(tmp_path):
    from cirkit.io.embeddings import read_embeddings

    bench = tmp_path / "bench"
    Image.new("RGB", (16, 16), "red").save(_images(bench) / "x.png")
    elsewhere = tmp_path / "cwd"
    Image.new("RGB", (16, 16), "blue").save(_images(elsewhere) / "x.png")  # a decoy with the same relative path
    absolute = tmp_path / "abs.png"
    Image.new("RGB", (16, 16), "green").save(absolute)
    gallery = bench / "gallery.jsonl"
    gallery.write_text(json.dumps({"id": "rel", "image": "imgs/x.png"}) + "\n"
                       + json.dumps({"id": "abs", "image": str(absolute)}) + "\n")
    ok(["embed", "../bench/gallery.jsonl", "--backbone", "fake", "-o", "g.lance", "--num-workers", "0"], cwd=elsewhere)
    _, ids, images, vecs = read_embeddings(elsewhere / "g.lance")
    got = dict(zip(ids, images, strict=True))
    assert Path(got["rel"]) == (bench / "imgs" / "x.png").resolve()
    assert Path(got["abs"]) == absolute.resolve()
    red = vecs[ids.index("rel")][:3]
    assert red[0] > 0.9 and abs(red[2]) < 0.1  # embedded the red image, not the blue decoy


def _generic_bench(root: Path, meta: dict) -> Path:
    bench = root / "bench"
    imgs = _images(bench)
    for c in ["blue", "green"]:
        Image.new("RGB", (16, 16), c).save(imgs / f"{c}.png")
    (bench / "gallery.jsonl").write_text("".join(
        json.dumps({"id": f"../../{c}", "image": f"imgs/{c}.png"}) + "\n" for c in ["a", "blue", "green"]))
    (bench / "queries.jsonl").write_text(json.dumps(
        {"id": "../../../q1", "reference": "imgs/a.png", "text": "make it blue", "targets": ["../../blue"]}) + "\n")
    (bench / "meta.json").write_text(json.dumps(meta))
    return bench


def test_ids_with_path_separators_stay_data(tmp_path):
    bench = _generic_bench(tmp_path / "work", {})
    subs = tmp_path / "work" / "out" / "subs"
    summary = ok(["evaluate", "generic", "-d", str(bench), "-b", "fake", "--submission", str(subs),
                  "-o", str(tmp_path / "work" / "out" / "metrics.json"), "--num-workers", "0"])
    assert summary["metrics"]["composed/test/R@1"] == pytest.approx(100.0)  # the blue target, found by its id
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")
                   if p.is_file() and "bench" not in p.relative_to(tmp_path).parts)
    assert files == [Path("work/out/metrics.json"), Path("work/out/subs/generic-test-rankings.jsonl")]
    rec = json.loads((subs / "generic-test-rankings.jsonl").read_text())
    assert rec["id"] == "../../../q1" and rec["hits"][0]["id"] == "../../blue"
    assert Path(rec["reference"]) == (bench / "imgs" / "a.png")  # relative to queries.jsonl


@pytest.mark.parametrize("meta", [{"name": "../../evil"}, {"split": "../../../evil"}, {"name": "/tmp/evil"}])
def test_submission_files_never_escape_the_output_folder(tmp_path, meta):
    bench = _generic_bench(tmp_path / "work", meta)
    subs = tmp_path / "work" / "out" / "subs"
    split = meta.get("split", "test")
    line = fails(["evaluate", "generic", "-d", str(bench), "-b", "fake", "--split", split, "--submission", str(subs),
                  "--num-workers", "0"])
    assert "escapes the output folder" in line and str(subs.resolve()) in line
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "bench" not in p.relative_to(tmp_path).parts]
    assert written == []
    assert not list(Path("/tmp").glob("evil*rankings.jsonl"))


def test_html_report_escapes_ids_and_texts(tmp_path):
    from cirkit.records import Result
    from cirkit.report import write_html

    evil = "<script>alert(1)</script>"
    out = write_html(tmp_path / "r.html", [Result(id=evil, reference=None, text=evil,
                                                  hits=[{"rank": 1, "id": evil, "score": 1.0, "image": str(tmp_path / "x'.png")}])])
    text = out.read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
