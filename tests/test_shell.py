"""cirkit in a user's shell (issue 14): what reaches stdout and stderr, exit codes, ``-``, paths in files.

Contracts about streams, exit codes and files run ``python -m cirkit`` in a real subprocess, as a
shell sees it; a gallery of solid-colour images embedded with the ``fake`` backbone keeps them
fast and exact. Library output, offline hubs and models are in ``test_libraries.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cirkit.backbones.fake import COLOURS

NAMES = ["red", "green", "blue", "yellow", "white"]
WARM = {"red", "yellow"}


def sh(*args: str, cwd: Path | None = None, stdin: str | None = None, env: dict | None = None,
       timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m cirkit ARGS`` in a subprocess (offline, one thread), text in and out."""
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "COLUMNS": "200", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "cirkit", *map(str, args)], cwd=cwd, input=stdin,
                          capture_output=True, text=True, env={**base, **(env or {})}, timeout=timeout)


def one_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """photos/ (five colours + one broken file), its fake store, an index with a ``warm`` column."""
    from PIL import Image

    from cirkit.embed import EmbedConfig
    from cirkit.embed import run as embed
    from cirkit.index import IndexConfig
    from cirkit.index import run as index

    root = tmp_path_factory.mktemp("shell")
    photos = root / "photos"
    photos.mkdir()
    for name in NAMES:
        Image.new("RGB", (24, 24), tuple(int(255 * c) for c in COLOURS[name])).save(photos / f"{name}.png")
    embed(EmbedConfig(input=photos, output=root / "gallery.lance", backbone="fake", model="fake", num_workers=0))
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    meta = root / "meta.jsonl"
    meta.write_text("".join(json.dumps({"id": n, "warm": n in WARM}) + "\n" for n in NAMES))
    index(IndexConfig(embeddings=root / "gallery.lance", output=str(root / "idx"), metadata=meta))
    return root


# -- stdout is for results; logs and progress go to stderr ------------------------------------------
@pytest.mark.slow
def test_json_on_stdout_parses_while_logging_at_info(gallery):
    proc = sh("query", gallery / "photos" / "red.png", "--index", gallery / "idx", "--where", "warm = true", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # the whole of stdout: one JSON object, nothing else
    assert "no --model given; using the index's model fake" in proc.stderr  # an INFO line, on stderr
    assert data["details"]["where"] == "warm = true" and data["details"]["columns"] == ["warm"]
    assert [h["id"] for h in data["details"]["hits"]] == ["red", "yellow"]
    assert all(h["metadata"] == {"warm": True} for h in data["details"]["hits"])
    quiet = sh("query", gallery / "photos" / "red.png", "--index", gallery / "idx", "--json", "-q")  # -q after
    assert quiet.returncode == 0 and quiet.stderr == "" and json.loads(quiet.stdout)["counts"]["queries"] == 1


@pytest.mark.slow
def test_table_on_stdout_and_summary_on_stderr_without_markup(gallery, tmp_path):
    proc = sh("embed", gallery / "photos", "--backbone", "fake", "-o", tmp_path / "g.lance", "-v")  # -v after
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "skipped" in proc.stderr and "broken.png" in proc.stderr and "[yellow]" not in proc.stderr
    assert "Traceback" not in proc.stderr
    table = sh("query", gallery / "photos" / "blue.png", "--index", gallery / "idx", "-k", "2")
    assert table.returncode == 0 and "blue.png" in table.stdout and "warm" in table.stdout  # path, metadata column
    assert "time (exact search)" in table.stderr and "time" not in table.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["query", "x.png", "--index", "i", "-k", "abc"], "'abc' is not a valid int"),
    (["embed", "photos"], "no output: pass -o gallery.lance"),
    (["query", "--text", "red"], "no index given"),
    (["synth"], "missing OUT (or --output)"),
    (["embed", "--no-such-flag"], "No such option"),
    (["caption", "photos", "-o", "-", "--json"], "--json and --output - both write to standard output"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, args, message):
    assert message in one_error(sh(*args, cwd=tmp_path), code=2)


# -- '-' is standard input and output for per-record files ----------------------------------------------
def _captions(folder: Path) -> str:
    return "".join(json.dumps({"id": n, "image": f"photos/{n}.png", "caption": f"a {n} circle"}) + "\n"
                   for n in NAMES)


@pytest.mark.slow
def test_caption_import_streams_records_to_stdout_with_absolute_paths(gallery, tmp_path):
    src = tmp_path / "mine.jsonl"
    src.write_text(_captions(gallery).replace('"photos/', f'"{gallery}/photos/'))
    proc = sh("caption", "--from", src, "-o", "-", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [r["id"] for r in records] == NAMES
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in records)
    assert "caption: rows 5, imported 5" in proc.stderr and "-> -" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.jsonl"]  # no file named '-', no lock file


@pytest.mark.slow
def test_reformulate_reads_stdin_and_streams_triplets_leaving_no_files(gallery):
    cwd = gallery  # relative image paths on stdin resolve against the working folder
    before = sorted(p.name for p in cwd.iterdir())
    proc = sh("reformulate", "-", "-o", "-", "--generator", "template", "-n", "6", cwd=cwd, stdin=_captions(gallery))
    assert proc.returncode == 0, proc.stderr
    triplets = [json.loads(x) for x in proc.stdout.splitlines()]
    assert triplets and all(t["instruction"].startswith("make it ") for t in triplets)
    assert all(Path(t["reference"]).is_absolute() and Path(t["reference"]).is_file() for t in triplets)
    summary = proc.stderr.splitlines()[-1]
    assert f"written {len(triplets)}" in summary and "rejected" not in summary.split("->")[1]
    assert sorted(p.name for p in cwd.iterdir()) == before  # no rejected file, no pairs plan, no locks


@pytest.mark.slow
def test_query_batch_from_stdin_to_stdout(gallery):
    queries = "".join(json.dumps({"id": f"q-{n}", "reference": f"photos/{n}.png"}) + "\n" for n in NAMES[:3])
    proc = sh("query", "--batch", "-", "-o", "-", "--index", gallery / "idx", "-k", "1", cwd=gallery, stdin=queries)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [(r["id"], r["hits"][0]["id"]) for r in results] == [("q-red", "red"), ("q-green", "green"), ("q-blue", "blue")]
    assert all(r["reference"] == str(gallery / "photos" / f"{n}.png") for r, n in zip(results, NAMES, strict=False))


@pytest.mark.slow
def test_embed_reads_a_gallery_listing_from_stdin(gallery, tmp_path):
    listing = "".join(json.dumps({"id": n, "image": f"photos/{n}.png"}) + "\n" for n in NAMES[:2])
    proc = sh("embed", "-", "--backbone", "fake", "-o", tmp_path / "g.lance", "--json", cwd=gallery, stdin=listing)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"]["embedded"] == 2
    from cirkit.io.embeddings import read_embeddings

    _, ids, images, _ = read_embeddings(tmp_path / "g.lance")
    assert ids == NAMES[:2] and images == [str(gallery / "photos" / f"{n}.png") for n in NAMES[:2]]


@pytest.mark.slow
def test_caption_with_a_model_from_stdin_to_stdout(gallery, tiny_llava, tmp_path):
    listing = "".join(json.dumps({"id": n, "image": str(gallery / "photos" / f"{n}.png")}) + "\n" for n in NAMES[:2])
    proc = sh("caption", "-", "-o", "-", "-m", tiny_llava, "--max-new-tokens", "3", "--num-workers", "0",
              cwd=tmp_path, stdin=listing)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["id"] for x in proc.stdout.splitlines()] == NAMES[:2]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, flag", [
    (["evaluate", "generic", "-d", "bench", "--backbone", "fake", "-o", "-"], "--output"),
    (["embed", "photos", "--backbone", "fake", "-o", "-"], "--output"),
    (["caption", "--from", "-", "-o", "c.jsonl"], "--from"),
    (["query", "--text", "red", "--index", "idx", "--html", "-"], "--html"),
    (["train", "-", "--stage", "1", "-o", "runs/x"], "DATA"),
    (["train", "d.jsonl", "--stage", "1", "-o", "-"], "--output"),
])
def test_dash_is_refused_where_nothing_streams(tmp_path, args, flag):
    from typer.testing import CliRunner

    from cirkit.cli import app

    res = CliRunner().invoke(app, ["-q", *args])
    assert res.exit_code == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} -: this setting names a file or folder"), res.stderr
    res = CliRunner().invoke(app, ["index", "gallery.lance", "-o", "-"])
    assert res.exit_code == 1 and "an index is a folder or a LanceDB URI, not a stream" in res.stderr


# -- paths inside a JSONL resolve relative to that file's folder -----------------------------------------
@pytest.mark.slow
def test_results_and_rankings_hold_paths_that_read_from_their_own_folder(gallery, tmp_path):
    ask = tmp_path / "ask"
    ask.mkdir()
    (ask / "photos").symlink_to(gallery / "photos")
    (ask / "queries.jsonl").write_text(json.dumps({"id": "q", "reference": "photos/green.png"}) + "\n")
    proc = sh("query", "--batch", "ask/queries.jsonl", "-o", "out/results.jsonl", "--index", gallery / "idx",
              "-k", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    assert Path(rec["reference"]).is_absolute() and Path(rec["reference"]).is_file()
    assert all(Path(h["image"]).is_absolute() and Path(h["image"]).is_file() for h in rec["hits"])

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "gallery.jsonl").write_text("".join(
        json.dumps({"id": n, "image": f"../ask/photos/{n}.png"}) + "\n" for n in NAMES))
    (bench / "queries.jsonl").write_text(json.dumps(
        {"id": "q1", "reference": "../ask/photos/red.png", "text": "make it blue", "targets": ["blue"]}) + "\n")
    proc = sh("evaluate", "generic", "-d", "bench", "--backbone", "fake", "-m", "fake", "--submission", "subs",
              "--num-workers", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (ranking,) = [json.loads(x) for x in (tmp_path / "subs" / "generic-test-rankings.jsonl").read_text().splitlines()]
    assert Path(ranking["reference"]).is_absolute() and Path(ranking["reference"]).is_file()
    assert all(Path(h["image"]).is_absolute() and Path(h["image"]).is_file() for h in ranking["hits"])


@pytest.mark.parametrize("url", ["http://example.com/a.jpg", "https://example.com/a.jpg", "s3://bucket/a.jpg",
                                 "file:///tmp/a.jpg"])
def test_a_url_in_a_gallery_is_one_line_naming_file_line_and_field(tmp_path, url):
    from typer.testing import CliRunner

    from cirkit.cli import app

    gal = tmp_path / "gallery.jsonl"
    gal.write_text(json.dumps({"id": "a", "image": "a.png"}) + "\n" + json.dumps({"id": "b", "image": url}) + "\n")
    for args in (["embed", gal, "--backbone", "fake", "-o", tmp_path / "g.lance"],
                 ["caption", gal, "-o", tmp_path / "c.jsonl"]):
        res = CliRunner().invoke(app, ["-q", *map(str, args)])
        assert res.exit_code == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip() == (f"error: {gal}:2: field 'image': {url!r} is a URL; cirkit reads images from "
                                      "local files, so download them and list their paths" + (
                                          " (relative to this file's folder, or absolute)" if args[0] == "embed" else ""))
    assert not (tmp_path / "g.lance").exists() and not (tmp_path / "c.jsonl").exists()


# -- a folder kept in sync: embed --sync && index --sync ----------------------------------------------------
@pytest.mark.slow
def test_a_folder_edit_then_sync_leaves_exactly_the_current_files_indexed(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()

    def paint(name: str, colour: str) -> None:
        Image.new("RGB", (24, 24), tuple(int(255 * c) for c in COLOURS[colour])).save(photos / f"{name}.png")

    for n in ("a", "b", "c"):
        paint(n, {"a": "red", "b": "green", "c": "blue"}[n])

    def sync() -> tuple[dict, dict]:
        e = sh("embed", "photos", "--backbone", "fake", "-o", "g.lance", "--sync", "--json", cwd=tmp_path)
        assert e.returncode == 0, e.stderr
        i = sh("index", "g.lance", "-o", "idx", "--sync", "--json", cwd=tmp_path)
        assert i.returncode == 0, i.stderr
        return json.loads(e.stdout)["counts"], json.loads(i.stdout)["counts"]

    def indexed() -> dict[str, list[float]]:
        from cirkit.search import open_index

        idx = open_index(str(tmp_path / "idx"), "images", None)
        cache = idx.cache()
        return {k: [round(float(x), 3) for x in cache.vectors[i][:3]] for i, k in enumerate(cache.ids.to_pylist())}

    sync()
    before = indexed()
    assert sorted(before) == ["a", "b", "c"]
    paint("d", "yellow")  # added
    time.sleep(0.01)
    paint("b", "white")  # modified: same name, new content (size or mtime differ)
    (photos / "c.png").unlink()  # removed
    emb, idx = sync()
    assert emb == {"images": 3, "embedded": 2, "already_stored": 1, "failed": 0, "changed": 1, "removed": 1}
    assert (idx["added"], idx["updated"], idx["deleted"], idx["rows"]) == (1, 1, 1, 3)
    now = indexed()
    assert sorted(now) == ["a", "b", "d"]
    assert now["b"] != before["b"] and now["b"][0] == now["b"][1] == now["b"][2]  # green -> white
    emb, idx = sync()  # nothing changed: nothing written
    assert emb == {"images": 3, "embedded": 0, "already_stored": 3, "failed": 0}
    assert (idx["added"], idx["updated"], idx["deleted"]) == (0, 0, 0)
    q = sh("query", "--text", "white", "--index", "idx", "-k", "1", "--json", cwd=tmp_path)
    assert json.loads(q.stdout)["details"]["hits"][0]["id"] == "b"  # the new content is what is searched
