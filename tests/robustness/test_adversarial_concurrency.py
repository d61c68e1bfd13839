"""Two real processes on every output kind, and readers that run while a writer works.

The first writer is a real ``cirkit`` process, made to hold its output a few seconds once it
has the lock (the stage code is the real one; only the lock is wrapped with a pause). The second
writer must fail at once with one line naming the first (its pid), and with ``--wait`` it must
queue, then either finish on top of the first's complete output or refuse it in one line (a
finished checkpoint, a synth folder without --overwrite). Readers (index reading a store that
embed is filling, checkpoint readers during training saves, queries during index updates) never
crash and never see a half-written state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import cli_env, fails, invoke, ok, read_lines, tree

pytest.importorskip("torch")

HOLDING = """
import contextlib, os, sys, time
import cirkit.io.lock as lock

real = lock.output_lock
target, seconds = os.environ["HOLD_OUTPUT"], float(os.environ["HOLD_SECONDS"])


@contextlib.contextmanager
def holding(output, *a, **k):
    with real(output, *a, **k) as path:
        if os.path.abspath(str(output)) == target:
            print("holding", flush=True)
            time.sleep(seconds)
        yield path


lock.output_lock = holding
from cirkit.cli import app
sys.argv = ["cirkit", "-q", *sys.argv[1:]]
app()
"""


def _first(args: list[str], hold: Path, seconds: float = 5.0) -> subprocess.Popen:
    """A real cirkit process that pauses ``seconds`` once it holds the lock of ``hold``."""
    env = {**cli_env(), "HOLD_OUTPUT": os.path.abspath(hold), "HOLD_SECONDS": str(seconds)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDING, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "holding":
        proc.wait()
        pytest.fail(f"the first writer never took its lock: {proc.stderr.read()[-2000:]}")
    return proc


def _image(world: Path) -> Path:
    return sorted((world / "synth" / "images").iterdir())[0]


def _bench(world: Path) -> Path:
    return world / "synth" / "benchmark" / "test"


def _ids_once(path: Path) -> bool:
    ids = [r["id"] for r in read_lines(path)]
    assert len(ids) == len(set(ids)) and ids, path
    return True


def _store_once(path: Path) -> bool:
    from cirkit.io.embeddings import read_embeddings

    ids = read_embeddings(path)[1]
    assert len(ids) == len(set(ids)) and ids
    return True


def _index_whole(path: Path) -> bool:
    from cirkit.search import open_index

    ix = open_index(path)
    assert ix.count() == len(set(ix.cache().ids.to_pylist())) > 0
    return True


def _json_with(key: str):
    return lambda path: key in json.loads(path.read_text())


# kind -> (args writing to T, the path the lock is on, what the second sees after waiting, check of the output)
def _kinds(world: Path, out: Path) -> dict[str, tuple[list[str], Path, str | None, object]]:
    from cirkit.report import is_report_html, is_report_png

    return {
        "captions": (["caption", "--from", str(world / "synth" / "all_captions.jsonl"), "-o", str(out / "c.jsonl")],
                     out / "c.jsonl", None, _ids_once),
        "triplets": (["reformulate", str(world / "synth" / "captions.jsonl"), "-g", "template", "-n", "8",
                      "--max-words", "40", "-o", str(out / "t.jsonl")], out / "t.jsonl", None, _ids_once),
        "results": (["query", "--batch", str(_bench(world) / "queries.jsonl"), "--index", str(world / "idx"), "-o",
                     str(out / "r.jsonl")], out / "r.jsonl", None, _ids_once),
        "store": (["embed", str(world / "synth" / "images"), "--backbone", "fake", "-o", str(out / "g.lance"),
                   "--num-workers", "0"], out / "g.lance", None, _store_once),
        "index": (["index", str(world / "g.lance"), "-o", str(out / "idx")], out / "idx" / "images.lance", None,
                  lambda p: _index_whole(p.parent)),
        "checkpoint": (["train", str(world / "synth" / "captions.jsonl"), "--stage", "1", "-m", "cirkit-tiny", "-o",
                        str(out / "run"), "--max-steps", "1", "--batch-size", "4", "--num-workers", "0"], out / "run",
                       # queued behind a run that finished with the same settings: it reports that run (issue 14)
                       None, lambda p: (p / "model.safetensors").is_file()),
        "synth": (["synth", str(out / "s"), "--train-triplets", "4", "--test-queries", "2", "--distractors", "2",
                   "--image-size", "16"], out / "s", "folder exists and is not empty",
                  lambda p: (p / "benchmark" / "meta.json").is_file()),
        "metrics": (["evaluate", "generic", "-d", str(_bench(world)), "--backbone", "fake", "--num-workers", "0", "-o",
                     str(out / "m.json")], out / "m.json", None, _json_with("primary_metric")),
        "submission": (["evaluate", "generic", "-d", str(_bench(world)), "--backbone", "fake", "--num-workers", "0",
                        "--submission", str(out / "subs")], out / "subs", None,
                       lambda p: _ids_once(p / "generic-test-rankings.jsonl")),
        "html": (["query", str(_image(world)), "red", "--index", str(world / "idx"), "--html", str(out / "r.html")],
                 out / "r.html", None, is_report_html),
        "grid": (["query", str(_image(world)), "red", "--index", str(world / "idx"), "--grid", str(out / "r.png")],
                 out / "r.png", None, is_report_png),
    }


KINDS = ["captions", "triplets", "results", "store", "index", "checkpoint", "synth", "metrics", "submission", "html",
         "grid"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_second_writer_fails_at_once_naming_the_first_and_wait_queues(world, tmp_path, kind):
    args, held, after_wait, intact = _kinds(world, tmp_path)[kind]
    first = _first(args, held)
    holding_since = time.monotonic()
    try:
        t0 = time.monotonic()
        line = fails(args)
        assert time.monotonic() - t0 < 4, "the second writer did not fail at once"
        assert first.poll() is None, "the first writer ended before the second was refused: the test proves nothing"
        assert line.startswith(f"error: {held}: another cirkit run is writing this ")
        assert f"(pid {first.pid} on " in line and "--wait" in line
        r = invoke(["-q", *args, "--wait"])  # queues behind the first, in this process
        assert time.monotonic() - holding_since > 4.5, "--wait returned while the first still held the output"
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    if after_wait is None:
        assert r.exit_code == 0, r.stderr
    else:
        assert r.exit_code == 1 and len(lines) == 1 and after_wait in lines[0], r.stderr
    assert intact(held)
    leftovers = [p for p in tree(tmp_path) if ".cirkit-tmp-" in p or p.endswith(".lock")]
    assert not leftovers, leftovers
    assert not [p for p in Path(tmp_path).rglob(".*.lock")], "a lock file was left behind"


@pytest.mark.slow
def test_a_killed_holder_frees_every_kind_at_once(world, tmp_path):
    """SIGKILL the holder: the kernel drops its lock, the next run goes ahead without --wait."""
    for kind in ("results", "metrics", "html"):
        args, held, _, intact = _kinds(world, tmp_path)[kind]
        first = _first(args, held, seconds=60)
        first.kill()
        first.communicate()
        ok(args)
        assert intact(held)


# -- readers while a writer works ------------------------------------------------------------------
_EMBED_SLOWLY = """
import sys, time
import cirkit.io.embeddings as e
real = e.EmbeddingStore.append
def slow(self, *a, **k):
    n = real(self, *a, **k)
    time.sleep(0.05)
    return n
e.EmbeddingStore.append = slow
from cirkit.cli import app
sys.argv = ["cirkit", "-q", "embed", sys.argv[1], "--backbone", "fake", "-o", sys.argv[2], "--batch-size", "1",
            "--num-workers", "0"]
app()
"""


@pytest.mark.slow
def test_index_reads_a_store_while_embed_fills_it(world, tmp_path):
    from cirkit.io.embeddings import read_embeddings

    store = tmp_path / "g.lance"
    writer = subprocess.Popen([sys.executable, "-c", _EMBED_SLOWLY, str(world / "synth" / "images"), str(store)],
                              env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, rounds = [], 0
    try:
        while writer.poll() is None or rounds < 2:
            if (store / "_versions").is_dir() and store.is_dir():
                ids = read_embeddings(store)[1]
                assert len(ids) == len(set(ids))
                seen.append(len(ids))
                summary = ok(["index", str(store), "-o", str(tmp_path / "idx")])
                assert summary["counts"]["rows"] >= len(ids)
                rounds += 1
            else:
                time.sleep(0.02)
    finally:
        assert writer.wait(timeout=300) == 0, writer.stderr.read().decode()[-2000:]
        writer.stderr.close()
    assert seen == sorted(seen), "a reader saw the store shrink"
    assert len(set(seen)) >= 2, "the reader never overlapped the writer"
    n = len(read_embeddings(store)[1])
    assert ok(["index", str(store), "-o", str(tmp_path / "idx")])["counts"]["rows"] == n


_SAVE_OFTEN = """
import sys
from cirkit.cli import app
sys.argv = ["cirkit", "-q", "train", sys.argv[1], "--stage", "1", "-m", "cirkit-tiny", "-o", sys.argv[2],
            "--max-steps", "30", "--batch-size", "4", "--num-workers", "0", "--save-every", "1", "--log-every", "1"]
app()
"""


@pytest.mark.slow
def test_checkpoint_readers_never_see_a_gap_while_training_saves(world, tmp_path):
    """Every save swaps the folder; a reader (embed/evaluate/query --model) must always find a whole checkpoint."""
    from cirkit.checkpoint import check_folder, load_safetensors

    out = tmp_path / "run"
    writer = subprocess.Popen([sys.executable, "-c", _SAVE_OFTEN, str(world / "synth" / "captions.jsonl"), str(out)],
                              env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reads = 0
    try:
        while writer.poll() is None:
            if not (out / "model.safetensors").exists():
                time.sleep(0.01)
                continue
            cfg = check_folder(out)
            assert load_safetensors(out / cfg.get("weights", "model.safetensors"))
            reads += 1
    finally:
        assert writer.wait(timeout=600) == 0, writer.stderr.read().decode()[-2000:]
        writer.stderr.close()
    assert reads > 10, reads


def test_a_reader_during_the_swap_itself_finds_a_whole_folder(tmp_path, monkeypatch):
    """The old swap was two renames with no folder at the path in between: a reader there failed."""
    from cirkit.io import atomic

    out = tmp_path / "ck"
    with atomic.atomic_dir(out, "checkpoint") as tmp:
        (tmp / "w").write_text("1")
    seen = []
    real_replace = os.replace

    def spy(a, b, *rest):
        real_replace(a, b, *rest)
        seen.append(sorted(p.name for p in out.iterdir()) if out.is_dir() else None)

    monkeypatch.setattr(atomic.os, "replace", spy)
    with atomic.atomic_dir(out, "checkpoint") as tmp:
        (tmp / "w").write_text("2")
    assert None not in seen, "a reader between the two renames found no folder"
    assert (out / "w").read_text() == "2" and not [p for p in tmp_path.iterdir() if p.name.startswith(".ck")]


_INDEX_AGAIN = """
import sys
from cirkit.index import IndexConfig, run
for r in range(int(sys.argv[3])):
    run(IndexConfig(embeddings=sys.argv[1] if r % 2 == 0 else sys.argv[2], output=sys.argv[4]))
"""


@pytest.mark.slow
def test_query_batch_and_reports_during_index_updates(world, tmp_path):
    """The CLI reader side: query --batch, --html and --grid while another process rewrites the index."""
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(world / "idx", idx)
    other = tmp_path / "g2.lance"
    ok(["embed", str(world / "synth" / "images"), "--backbone", "fake", "-o", str(other), "--num-workers", "0",
        "--batch-size", "7"])
    writer = subprocess.Popen([sys.executable, "-c", _INDEX_AGAIN, str(world / "g.lance"), str(other), "6", str(idx)],
                              env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    n = 0
    try:
        while writer.poll() is None or n < 2:
            out = tmp_path / f"r{n}"
            ok(["query", "--batch", str(_bench(world) / "queries.jsonl"), "--index", str(idx), "-o",
                str(out / "r.jsonl"), "--html", str(out / "r.html"), "--grid", str(out / "r.png")])
            _ids_once(out / "r.jsonl")
            n += 1
    finally:
        assert writer.wait(timeout=300) == 0, writer.stderr.read().decode()[-2000:]
        writer.stderr.close()
