"""cirkit query through the CLI on a gallery of solid-colour images with the fake backbone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cirkit.backbones.fake import COLOURS

GALLERY = ["red", "green", "blue", "yellow", "purple", "cyan", "white", "black", "orange", "pink"]


def invoke(*args: str):
    from cirkit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Solid-colour PNGs, their fake embeddings, an index with a metadata column."""
    from PIL import Image

    from cirkit.backbones import load_backbone
    from cirkit.backbones.base import BackboneSpec
    from cirkit.encode import encode_images
    from cirkit.index import IndexConfig, run
    from cirkit.io.embeddings import EmbeddingStore

    root = tmp_path_factory.mktemp("gallery")
    (root / "images").mkdir()
    items = []
    for name in GALLERY:
        rgb = tuple(int(255 * c) for c in COLOURS[name])
        p = root / "images" / f"{name}.png"
        Image.new("RGB", (24, 24), rgb).save(p)
        items.append((name, p))
    bb = load_backbone(BackboneSpec(backbone="fake", model="fake"))
    enc = encode_images(bb, items, num_workers=0)
    store = EmbeddingStore.open_for_append(root / "gallery.lance", bb.manifest())
    store.append(enc.ids, [f"images/{k}.png" for k in enc.ids], enc.vectors.numpy())
    meta = root / "meta.jsonl"
    warm = {"red", "yellow", "orange", "pink"}
    meta.write_text("\n".join(json.dumps({"id": k, "warm": k in warm}) for k in GALLERY) + "\n")
    run(IndexConfig(embeddings=root / "gallery.lance", output=str(root / "idx"), metadata=meta))
    return root


def q(gallery: Path, *args: str) -> dict:
    res = invoke("query", *args, "--index", gallery / "idx", "--backbone", "fake", "--model", "fake", "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_composed_query_finds_the_target(gallery):
    out = q(gallery, gallery / "images" / "blue.png", "make it red", "-k", "3")
    hits = out["details"]["hits"]
    assert hits[0]["id"] == "red" and [h["rank"] for h in hits] == [1, 2, 3]
    assert Path(hits[0]["image"]) == (gallery / "images" / "red.png").resolve()
    timing = out["details"]["timing_s"]
    assert {"open_index", "model_load", "embedding", "search"} <= set(timing)
    assert out["details"]["search"] == "exact"


def test_image_only_and_exclude_reference(gallery):
    ref = gallery / "images" / "blue.png"
    assert q(gallery, ref, "-k", "2")["details"]["hits"][0]["id"] == "blue"
    hits = q(gallery, ref, "-k", "2", "--exclude-reference")["details"]["hits"]
    assert "blue" not in [h["id"] for h in hits] and len(hits) == 2


def test_text_only_and_where(gallery):
    assert q(gallery, "--text", "a red circle", "-k", "1")["details"]["hits"][0]["id"] == "red"
    hits = q(gallery, "--text", "something blue", "-k", "3", "--where", "warm = true")["details"]["hits"]
    assert {h["id"] for h in hits} <= {"red", "yellow", "orange", "pink"} and len(hits) == 3


def test_table_output_and_timing_line(gallery):
    res = invoke("query", gallery / "images" / "green.png", "turn it yellow", "--index", gallery / "idx", "--backbone", "fake")
    assert res.exit_code == 0, res.output
    assert "yellow" in res.stdout and "rank" in res.stdout
    assert "model load" in res.output and "search" in res.output


def test_default_model_is_the_indexs(gallery):
    res = invoke("query", gallery / "images" / "blue.png", "make it red", "--index", gallery / "idx", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["details"]["hits"][0]["id"] == "red"


def test_query_with_another_model_is_refused(gallery, tmp_path):
    from cirkit.index import IndexConfig, run
    from cirkit.io.embeddings import EmbeddingStore
    from cirkit.records import EmbeddingManifest

    m = EmbeddingManifest(backbone="clip", checkpoint="ViT-B-32@openai", dim=32)
    store = EmbeddingStore.open_for_append(tmp_path / "o.lance", m)
    store.append(["a"], ["a.png"], np.eye(1, 32, dtype=np.float32))
    run(IndexConfig(embeddings=tmp_path / "o.lance", output=str(tmp_path / "idx")))
    res = invoke("query", "--text", "red", "--index", tmp_path / "idx", "--backbone", "fake")
    assert res.exit_code == 1
    msg = " ".join(res.output.split())
    assert "clip ViT-B-32@openai (dim 32)" in msg and "fake fake (dim 32)" in msg


def test_user_errors_exit_1(gallery, tmp_path):
    res = invoke("query", "--text", "red", "--index", tmp_path / "nothing", "--backbone", "fake")
    assert res.exit_code == 1 and "cirkit index" in res.output
    res = invoke("query", tmp_path / "missing.png", "--index", gallery / "idx", "--backbone", "fake")
    assert res.exit_code == 1 and "no such file" in res.output


def test_html_contact_sheet_images_decode_and_links_resolve(gallery, tmp_path):
    import base64
    import io
    import re
    from urllib.parse import unquote

    from PIL import Image

    out = tmp_path / "sheet" / "out.html"
    q(gallery, gallery / "images" / "blue.png", "make it red", "-k", "4", "--html", out)
    text = out.read_text()
    uris = re.findall(r"src='data:image/(?:jpeg|png);base64,([^']+)'", text)
    assert len(uris) == 5  # query + 4 results
    for u in uris:
        Image.open(io.BytesIO(base64.b64decode(u))).verify()
    links = re.findall(r"href='([^']+)'", text)
    assert len(links) == 5
    for href in links:
        assert (out.parent / unquote(href)).resolve().is_file(), href
    assert "make it red" in text


def test_grid_png_opens(gallery, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    q(gallery, gallery / "images" / "blue.png", "make it red", "-k", "3", "--grid", out)
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.width > 4 * 128 and im.height >= 128


def test_batch_resumes_without_duplicates(gallery, tmp_path):
    qf = tmp_path / "queries.jsonl"
    rows = [
        {"id": "q1", "reference": str(gallery / "images" / "blue.png"), "text": "make it red", "targets": ["red"]},
        {"id": "q2", "reference": str(gallery / "images" / "red.png"), "text": "make it green", "targets": ["green"]},
        {"id": "q3", "text": "yellow", "targets": ["yellow"]},
        {"id": "q4", "reference": str(gallery / "images" / "cyan.png"), "reference_id": "cyan"},
    ]
    qf.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res_file = tmp_path / "results.jsonl"
    args = ("--batch", qf, "-o", res_file, "-k", "3", "--exclude-reference")
    out = q(gallery, *args)
    assert out["counts"]["written"] == 4
    lines = [json.loads(x) for x in res_file.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["q1", "q2", "q3", "q4"]
    assert [r["hits"][0]["id"] for r in lines[:3]] == ["red", "green", "yellow"]
    assert "cyan" not in [h["id"] for h in lines[3]["hits"]]
    # simulate a crash after two results and a torn third line
    kept = res_file.read_text().splitlines()[:2]
    res_file.write_text("\n".join(kept) + "\n" + '{"id": "q3", "hi')
    out = q(gallery, *args)
    assert out["counts"] == {"queries": 4, "written": 2, "already_done": 2}
    ids = [json.loads(x)["id"] for x in res_file.read_text().splitlines()]
    assert sorted(ids) == ["q1", "q2", "q3", "q4"]
    out = q(gallery, *args)
    assert out["counts"]["written"] == 0


def test_synth_benchmark_end_to_end(synth_dir, tmp_path):
    """embed -> index -> query --batch on the synth test split: the fake backbone finds targets."""
    from cirkit.embed import EmbedConfig
    from cirkit.embed import run as embed

    split = synth_dir / "benchmark" / "test"
    embed(EmbedConfig(input=split / "gallery.jsonl", output=tmp_path / "g.lance", backbone="fake", num_workers=0))
    res = invoke("index", tmp_path / "g.lance", "-o", tmp_path / "idx", "--json")
    assert res.exit_code == 0, res.output
    out = tmp_path / "results.jsonl"
    composed = q_at(tmp_path / "idx", "--batch", split / "queries.jsonl", "-o", out, "-k", "10", "--exclude-reference")
    queries = {json.loads(x)["id"]: json.loads(x) for x in (split / "queries.jsonl").read_text().splitlines()}
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert composed["counts"]["written"] == len(queries) == len(results)
    found = [bool(set(queries[r["id"]]["targets"]) & {h["id"] for h in r["hits"]}) for r in results]
    assert sum(found) >= 0.3 * len(found), sum(found)  # 12 of 28 with seed 0
    # a single composed query through the CLI puts that query's target in its top-10
    r = next(r for r, ok in zip(results, found, strict=True) if ok)
    qy = queries[r["id"]]
    ref = (split / qy["reference"]).resolve()
    single = q_at(tmp_path / "idx", ref, qy["text"], "-k", "10", "--exclude-reference")
    assert set(qy["targets"]) & {h["id"] for h in single["details"]["hits"]}


def q_at(index: Path, *args) -> dict:
    res = invoke("query", *args, "--index", index, "--backbone", "fake", "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_json_carries_metadata_columns_and_echoes_where(gallery):
    out = q(gallery, "--text", "something blue", "-k", "2", "--where", "warm = true")
    d = out["details"]
    assert d["where"] == "warm = true" and d["columns"] == ["warm"] and d["table"] == "images"
    assert all(h["metadata"] == {"warm": True} for h in d["hits"])
    assert d["model"]["backbone"] == "fake" and d["query"] == {"reference": None, "text": "something blue"}


def test_table_shows_metadata_columns(gallery):
    res = invoke("query", "--text", "red", "-k", "2", "--index", gallery / "idx", "--backbone", "fake")
    assert res.exit_code == 0, res.output
    header = next(line for line in res.stdout.splitlines() if "rank" in line)
    assert "warm" in header and "True" in res.stdout


def test_python_api_answers_with_typed_records(gallery):
    from cirkit.query import QueryConfig, QueryResult, run
    from cirkit.records import Hit, Result

    r = run(QueryConfig(text="make it red", index=str(gallery / "idx"), backbone="fake", model="fake", k=3))
    assert isinstance(r, QueryResult) and r.single and len(r.answers) == 1
    answer = r.answers[0]
    assert isinstance(answer, Result) and all(isinstance(h, Hit) for h in answer.hits)
    assert r.hits == answer.hits and answer.hits[0].id == "red" and answer.hits[0].metadata == {"warm": True}
    assert r.model.backbone == "fake" and "hits" not in r.details  # dicts only at the JSON boundary
    assert r.to_dict()["details"]["hits"][0] == answer.hits[0].to_dict()


def test_html_carries_metadata(gallery, tmp_path):
    out = tmp_path / "m.html"
    q(gallery, "--text", "red", "-k", "2", "--html", out)
    assert "warm: True" in out.read_text()


def test_batch_results_hold_absolute_references_and_metadata(gallery, tmp_path):
    (tmp_path / "qs").mkdir()
    qf = tmp_path / "qs" / "queries.jsonl"
    shutil.copy(gallery / "images" / "blue.png", tmp_path / "qs" / "ref.png")
    qf.write_text(json.dumps({"id": "q1", "reference": "ref.png", "text": "make it red"}) + "\n")
    res_file = tmp_path / "elsewhere" / "results.jsonl"
    q(gallery, "--batch", qf, "-o", res_file, "-k", "2")
    rec = json.loads(res_file.read_text())
    assert Path(rec["reference"]) == (tmp_path / "qs" / "ref.png").resolve()
    assert rec["hits"][0]["id"] == "red" and rec["hits"][0]["metadata"] == {"warm": True}


@pytest.mark.parametrize("args, message", [
    (("--batch", "Q", "-o", "Q"), "--output would overwrite --batch"),
    (("--batch", "Q", "--html", "Q"), "--html would overwrite --batch"),
    (("--text", "red", "--html", "S", "--grid", "S"), "--grid would overwrite --html"),
    (("--text", "red", "--nprobes", "-1"), "--nprobes must be at least 1, got -1"),
    (("--text", "red", "--refine-factor", "-3"), "--refine-factor must be at least 1, got -3"),
    (("--text", "red", "--search", "fast"), "unknown --search 'fast'; choose one of auto, exact, ann"),
    (("--text", "red", "--table", "../victim"), "--table '../victim' is not a plain name"),
])
def test_bad_settings_are_one_line_and_touch_nothing(gallery, tmp_path, args, message):
    qf = tmp_path / "queries.jsonl"
    qf.write_text(json.dumps({"id": "q1", "text": "red"}) + "\n")
    before = qf.read_bytes()
    sub = {"Q": str(qf), "S": str(tmp_path / "same.out")}
    res = invoke("query", *[sub.get(a, a) for a in args], "--index", gallery / "idx", "--backbone", "fake")
    assert res.exit_code == 1, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output
    assert qf.read_bytes() == before and not (tmp_path / "same.out").exists()


def test_the_missions_example_runs_as_written_with_CIRKIT_INDEX(gallery, monkeypatch):
    """`cirkit query img.jpg "make it red"` with no --index and no --model: $CIRKIT_INDEX and the index's model."""
    monkeypatch.setenv("CIRKIT_INDEX", str(gallery / "idx"))
    res = invoke("query", gallery / "images" / "blue.png", "make it red", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["details"]["index"] == str(gallery / "idx")
    assert out["details"]["hits"][0]["id"] == "red"
    # --index still wins over the variable
    monkeypatch.setenv("CIRKIT_INDEX", str(gallery / "no-such-index"))
    assert invoke("query", gallery / "images" / "blue.png", "make it red", "--index", gallery / "idx").exit_code == 0


def test_no_index_anywhere_is_one_line_naming_both_ways(gallery, monkeypatch):
    monkeypatch.delenv("CIRKIT_INDEX", raising=False)
    res = invoke("query", gallery / "images" / "blue.png", "make it red")
    assert res.exit_code == 2 and "--index INDEX" in res.stderr and "CIRKIT_INDEX" in res.stderr  # a usage error
    monkeypatch.setenv("CIRKIT_INDEX", "   ")  # blank: as if unset
    assert "CIRKIT_INDEX" in invoke("query", gallery / "images" / "blue.png", "make it red").stderr
