"""SIGKILL inside the creation of every output kind, at named points, then the same command again.

A real ``python -m cirkit`` process kills itself (SIGKILL: no cleanup, no ``finally``) the moment
it reaches a chosen call: the rename that puts a file or a Lance table in place, the swap of a
folder, the clean-up right after a swap, a half-written JSONL line, a trainer-state file. The
re-run must resume or clean up: no temp or set-aside copies, no lock files, no duplicated or lost
record, and the output equal to an uninterrupted run's (bit-identical where the stage promises
it: synth, metrics, submissions, reports, stores).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import cli_env, ok, read_lines, tree

pytest.importorskip("torch")

KILLER = """
import importlib, os, signal, sys
module, attr, nth, match, mode = sys.argv[1:6]
obj = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    obj = getattr(obj, part)
real = getattr(obj, name)
calls = [0]


def hook(*a, **k):
    if match == "*" or any(match in str(x) for x in a):
        calls[0] += 1
        if calls[0] == int(nth):
            if mode == "torn":  # write half of this line, then die
                real(a[0], bytes(a[1])[: max(1, len(a[1]) // 2)])
            os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)


setattr(obj, name, hook)
from cirkit.cli import app
sys.argv = ["cirkit", "-q", *sys.argv[6:]]
app()
"""


def _killed(args: list[str], module: str, attr: str, nth: int = 1, match: str = "*", mode: str = "kill") -> None:
    r = subprocess.run([sys.executable, "-c", KILLER, module, attr, str(nth), match, mode, *args], env=cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, f"the run was not killed at {attr} (exit {r.returncode}): {r.stderr[-2000:]}"


def _bench(world: Path) -> Path:
    return world / "synth" / "benchmark" / "test"


def _image(world: Path) -> Path:
    return sorted((world / "synth" / "images").iterdir())[0]


# kind -> args writing under folder O (the output is always O/out[...])
ARGS = {
    "synth": lambda w, o: ["synth", str(o / "out"), "--train-triplets", "6", "--test-queries", "3", "--distractors",
                           "3", "--image-size", "16", "--seed", "3"],
    "metrics": lambda w, o: ["evaluate", "generic", "-d", str(_bench(w)), "--backbone", "fake", "--num-workers", "0",
                             "-o", str(o / "out.json")],
    "submission": lambda w, o: ["evaluate", "generic", "-d", str(_bench(w)), "--backbone", "fake", "--num-workers", "0",
                                "--submission", str(o / "out")],
    "html": lambda w, o: ["query", str(_image(w)), "red", "--index", str(w / "idx"), "--html", str(o / "out.html")],
    "grid": lambda w, o: ["query", str(_image(w)), "red", "--index", str(w / "idx"), "--grid", str(o / "out.png")],
    "results": lambda w, o: ["query", "--batch", str(_bench(w) / "queries.jsonl"), "--index", str(w / "idx"),
                             "--batch-size", "1", "-o", str(o / "out.jsonl")],
    "captions": lambda w, o: ["caption", "--from", str(w / "synth" / "all_captions.jsonl"), "-o", str(o / "out.jsonl")],
    "triplets": lambda w, o: ["reformulate", str(w / "synth" / "captions.jsonl"), "-g", "template", "-n", "8",
                              "--max-words", "40", "-o", str(o / "out.jsonl")],
    "store": lambda w, o: ["embed", str(w / "synth" / "images"), "--backbone", "fake", "-o", str(o / "out.lance"),
                           "--batch-size", "4", "--num-workers", "0"],
    "index": lambda w, o: ["index", str(w / "g.lance"), "-o", str(o / "out")],
    "cache": lambda w, o: ["query", str(_image(w)), "red", "--index", str(o / "out")],
}

# (kind, kill point id, module, attribute, nth call, argument match, mode)
POINTS = [
    ("synth", "rendering", "cirkit.synth", "png_bytes", 5, "*", "kill"),
    ("synth", "rename_in", "os", "replace", 1, "out", "kill"),
    ("synth", "swap_over_previous", "cirkit.io.atomic", "_exchange", 1, "*", "kill"),
    ("synth", "cleanup_after_swap", "shutil", "rmtree", 1, ".out.cirkit-tmp-", "kill"),
    ("metrics", "before_fsync", "os", "fsync", 1, "*", "kill"),
    ("metrics", "rename_in", "os", "replace", 1, "out.json", "kill"),
    ("submission", "rename_in", "os", "replace", 1, "rankings", "kill"),
    ("html", "rename_in", "os", "replace", 1, "out.html", "kill"),
    ("grid", "rename_in", "os", "replace", 1, "out.png", "kill"),
    ("results", "torn_line", "os", "write", 3, "*", "torn"),
    ("results", "after_records", "cirkit.io.jsonl", "JsonlAppender.write", 4, "*", "kill"),
    ("captions", "torn_line", "os", "write", 5, "*", "torn"),
    ("triplets", "torn_line", "os", "write", 2, "*", "torn"),
    ("store", "table_rename_in", "os", "rename", 1, "out.lance", "kill"),
    ("store", "after_commits", "cirkit.io.embeddings", "EmbeddingStore.append", 3, "*", "kill"),
    ("index", "table_rename_in", "os", "rename", 1, "images.lance", "kill"),
    ("cache", "vectors_rename_in", "os", "replace", 1, "vectors.npy", "kill"),
]


def _reference(world: Path, root: Path, kind: str) -> Path:
    folder = root / "ref" / kind
    folder.mkdir(parents=True)
    if kind == "cache":
        ok(ARGS["index"](world, folder))
    ok(ARGS[kind](world, folder))
    return folder


@pytest.fixture(scope="module")
def refs(world, tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the re-runs (conftest's one_thread): sums in the same order, the same bits
    try:
        root = tmp_path_factory.mktemp("crash-refs")
        return {kind: _reference(world, root, kind) for kind in ARGS}
    finally:
        torch.set_num_threads(before)


def _leftovers(folder: Path) -> list[str]:
    return [p for p in tree(folder) if ".cirkit-tmp-" in p or ".cirkit-old-" in p] + \
        [str(p) for p in folder.rglob(".*.lock")]


def _same(kind: str, got: Path, want: Path) -> None:
    if kind in ("results", "captions", "triplets"):
        a, b = read_lines(got / "out.jsonl"), read_lines(want / "out.jsonl")
        ids = [r["id"] for r in a]
        assert len(ids) == len(set(ids)), "a record was written twice"
        if kind == "results":  # queries embedded in other batches may differ in the last float bits
            hits = {r["id"]: [(h["id"], pytest.approx(h["score"], abs=1e-5)) for h in r["hits"]] for r in b}
            assert {r["id"]: [(h["id"], h["score"]) for h in r["hits"]] for r in a} == hits
            return
        key = (lambda r: (r["id"], json.dumps(r, sort_keys=True))) if kind != "triplets" else (lambda r: r["id"])
        assert sorted(map(key, a)) == sorted(map(key, b))
        return
    if kind in ("store",):
        from cirkit.io.embeddings import read_embeddings

        _, ids, _, vec = read_embeddings(got / "out.lance")
        _, ids2, _, vec2 = read_embeddings(want / "out.lance")
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(ids2)
        order, order2 = sorted(range(len(ids)), key=ids.__getitem__), sorted(range(len(ids2)), key=ids2.__getitem__)
        assert (vec[order] == vec2[order2]).all()
        return
    if kind in ("index", "cache"):
        from cirkit.search import open_index

        a, b = open_index(got / "out"), open_index(want / "out")
        assert sorted(a.cache().ids.to_pylist()) == sorted(b.cache().ids.to_pylist())
        return
    mine, theirs = tree(got), tree(want)
    assert mine == theirs, sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))[:5]


@pytest.mark.slow
@pytest.mark.parametrize("kind, point, module, attr, nth, match, mode", POINTS, ids=[f"{p[0]}-{p[1]}" for p in POINTS])
def test_killed_inside_creation_then_rerun(world, refs, tmp_path, kind, point, module, attr, nth, match, mode):
    folder = tmp_path / "ref" / kind  # the reference's depth, so relative links in reports are equal
    folder.mkdir(parents=True)
    if kind == "cache":
        ok(ARGS["index"](world, folder))
        import shutil

        shutil.rmtree(folder / "out" / "images.cache")
    if point in ("swap_over_previous", "cleanup_after_swap"):
        ok(ARGS[kind](world, folder) + ["--seed", "4"])  # an earlier output of the same kind, to swap over
    args = ARGS[kind](world, folder)
    if point in ("swap_over_previous", "cleanup_after_swap"):
        args = [*args, "--overwrite"]
    _killed(args, module, attr, nth, match, mode)
    ok(args)
    assert not _leftovers(folder), _leftovers(folder)
    _same(kind, folder, refs[kind])
    if kind != "synth":  # the same command again changes nothing (synth refuses a full OUT without --overwrite)
        ok(args)
        _same(kind, folder, refs[kind])


# -- the checkpoint: kills inside a save, then --resume (or the same command) continues exactly ------------
def _train(world: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(world / "synth" / "captions.jsonl"), "--stage", "1", "-m", "cirkit-tiny", "-o", str(out),
            "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1", "--num-workers", "0",
            "--log-every", "1", "--save-every", "1", *extra]


@pytest.fixture(scope="module")
def train_ref(world, tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("train-ref") / "run"
        ok(_train(world, out))
        return out
    finally:
        torch.set_num_threads(before)


SAVE_POINTS = [
    ("state_file", "safetensors.torch", "save_file", 6, "*"),        # 2nd save, while writing trainer_state/
    ("swap", "cirkit.io.atomic", "_exchange", 1, "*"),                # 2nd save, at the swap itself
    ("cleanup_after_swap", "shutil", "rmtree", 1, ".run.cirkit-tmp-"),
    ("metrics_line", "cirkit.checkpoint", "append_metrics", 3, "*"),  # between saves
]


@pytest.mark.slow
@pytest.mark.parametrize("point, module, attr, nth, match", SAVE_POINTS, ids=[p[0] for p in SAVE_POINTS])
def test_train_killed_inside_a_save_resumes_to_the_same_weights(world, train_ref, tmp_path, point, module, attr, nth,
                                                                 match):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    _killed(_train(world, out), module, attr, nth, match)
    ok(_train(world, out))  # the same command continues an interrupted run
    assert not _leftovers(tmp_path), _leftovers(tmp_path)
    got, want = read_lines(out / "metrics.jsonl"), read_lines(train_ref / "metrics.jsonl")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-5)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(train_ref / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)


def test_a_dead_writers_temps_of_every_kind_are_removed_by_the_next_run(world, tmp_path):
    """Temps named for a dead pid (as a kill leaves them) go at the next run; a live pid's stay."""
    import shutil

    from cirkit.io.atomic import _HOST

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    for kind in ("metrics", "html", "grid", "synth", "store"):
        folder = tmp_path / kind
        folder.mkdir()
        name = {"metrics": "out.json", "html": "out.html", "grid": "out.png", "synth": "out", "store": "out.lance"}[kind]
        for who in (pid, 1):  # pid 1 is alive
            stale = folder / f".{name}.cirkit-tmp-{_HOST}-{who}-0badc0de"
            (stale.mkdir() if kind in ("synth", "store") else stale.write_bytes(b"half"))
        ok(ARGS[kind](world, folder))
        left = sorted(p.name for p in folder.iterdir() if ".cirkit-tmp-" in p.name)
        assert left == [f".{name}.cirkit-tmp-{_HOST}-1-0badc0de"], (kind, left)
        shutil.rmtree(folder)
