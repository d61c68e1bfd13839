"""One writer per store and per index table, readers that never crash, crash-safe creation.

Each concurrency case runs a real ``python -m cirkit`` (or ``python -c``) process as the
first writer and this process as the second writer or the reader.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from .conftest import cli_env, fails, invoke, kill_when, ok, png_folder, spawn  # noqa: E402

N_IMAGES = 200
N_ROWS = 3000


def _wait_locked(output: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    from cirkit.io.lock import is_locked

    deadline = time.monotonic() + timeout
    while not is_locked(output):
        if proc.poll() is not None:
            pytest.fail(f"the first writer ended before taking its lock: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the first writer never took its lock")
        time.sleep(0.02)


def _finish(proc: subprocess.Popen) -> None:
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    proc.stderr.close()


# -- embed -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return png_folder(tmp_path_factory.mktemp("imgs") / "images", N_IMAGES, size=16)


def test_a_second_embed_on_one_store_fails_at_once_naming_the_first(images, tmp_path):
    from cirkit.embed import EmbedConfig
    from cirkit.embed import run as embed
    from cirkit.io.embeddings import read_embeddings

    out = tmp_path / "g.lance"
    args = ["embed", str(images), "--backbone", "fake", "-o", str(out), "--batch-size", "1", "--num-workers", "0"]
    first = spawn(args)
    try:
        _wait_locked(out, first)
        t0 = time.monotonic()
        line = fails(args)
        assert time.monotonic() - t0 < 10
        assert f"another cirkit run is writing this embeddings store (pid {first.pid} on " in line
        assert " embed " in line and "--wait" in line
        assert first.poll() is None, "the first embed ended before the second was refused"
        # queued behind it instead (the settings' --wait): runs after it, adds nothing twice
        cfg = EmbedConfig(input=images, output=out, backbone="fake", num_workers=0, batch_size=8)
        cfg.wait = True
        r = embed(cfg)
        # it ran only once the first had released the store, i.e. after it had stored everything
        assert r.counts["already_stored"] == N_IMAGES and r.counts["embedded"] == 0
    finally:
        _finish(first)
    _, ids, _, _ = read_embeddings(out)
    assert len(ids) == len(set(ids)) == N_IMAGES


def test_embed_killed_while_creating_its_store_reruns_cleanly(images, tmp_path):
    """Kill at the first sign of the store (its temp folder or the store itself), then re-run."""
    from cirkit.io.embeddings import read_embeddings

    out = tmp_path / "g.lance"
    args = ["embed", str(images), "--backbone", "fake", "-o", str(out), "--batch-size", "1", "--num-workers", "0"]
    started = lambda: out.exists() or any(tmp_path.glob(".g.lance.cirkit-tmp-*"))  # noqa: E731
    assert kill_when(spawn(args), started), "embed finished before it could be killed"
    summary = ok(args)
    assert summary["counts"]["embedded"] + summary["counts"]["already_stored"] == N_IMAGES
    _, ids, _, _ = read_embeddings(out)
    assert len(ids) == len(set(ids)) == N_IMAGES
    assert not list(tmp_path.glob(".g.lance.cirkit-tmp-*")), "the dead run's temp folder was left behind"


def test_a_dead_runs_half_made_store_is_removed_and_a_live_ones_kept(images, tmp_path):
    from cirkit.io.atomic import _HOST

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    half = tmp_path / f".g.lance.cirkit-tmp-{_HOST}-{dead_pid}-0badc0de"
    (half / "g.lance" / "_versions").mkdir(parents=True)
    live = tmp_path / f".g.lance.cirkit-tmp-{_HOST}-1-0badc0de"  # pid 1 is alive
    live.mkdir()
    summary = ok(["embed", str(images), "--backbone", "fake", "-o", str(tmp_path / "g.lance"), "--num-workers", "0"])
    assert summary["counts"]["embedded"] == N_IMAGES
    assert not half.exists() and live.exists()


@pytest.mark.parametrize("target", ["input", "odd name"])
def test_embed_output_that_cannot_be_a_store_is_one_line(images, tmp_path, target):
    out = str(images) if target == "input" else str(tmp_path / "my store.lance")
    before = sorted(p.name for p in images.iterdir())
    line = fails(["embed", str(images), "--backbone", "fake", "-o", out])
    assert ("must end in .lance" in line) if target == "input" else ("is not a plain name" in line)
    assert sorted(p.name for p in images.iterdir()) == before
    assert not (tmp_path / "my store.lance").exists() and not list(tmp_path.glob(".my store*"))


def test_embed_into_its_own_input_is_refused(tmp_path):
    src = tmp_path / "g.lance"
    png_folder(src, 3, size=16)  # a folder of images that happens to be named like a store
    line = fails(["embed", str(src), "--backbone", "fake", "-o", str(src)])
    assert "is also the input" in line
    assert sorted(p.name for p in src.iterdir()) == ["im000.png", "im001.png", "im002.png"]


# -- index -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two 3000 x 32 stores with the same ids and different vectors."""
    from cirkit.io.embeddings import EmbeddingStore
    from cirkit.records import EmbeddingManifest

    root = tmp_path_factory.mktemp("stores")
    ids = [f"i{k:05d}" for k in range(N_ROWS)]
    out = []
    for seed in (0, 1):
        v = np.random.default_rng(seed).standard_normal((N_ROWS, 32)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        s = EmbeddingStore.open_for_append(root / f"e{seed}.lance", EmbeddingManifest(backbone="fake", checkpoint="fake", dim=32))
        s.append(ids, [f"img/{i}.png" for i in ids], v)
        out.append(root / f"e{seed}.lance")
    return ids, out


def test_a_second_index_run_fails_at_once_naming_the_first(stores, tmp_path):
    from cirkit.search import open_index

    ids, (e0, _) = stores
    idx = tmp_path / "idx"
    args = ["index", str(e0), "-o", str(idx), "--ann"]
    first = spawn(args)
    try:
        _wait_locked(idx / "images.lance", first)
        line = fails(["index", str(e0), "-o", str(idx)])
        assert f"another cirkit run is writing this index table (pid {first.pid} on " in line
        assert first.poll() is None, "the first index run ended before the second was refused"
    finally:
        _finish(first)
    ix = open_index(idx)
    assert sorted(ix.cache().ids.to_pylist()) == ids and ix.ann_info()["recorded"] is True
    assert not list(idx.glob(".images.lance.cirkit-tmp-*"))


_WRITER = """
import sys
from cirkit.index import IndexConfig, run
stores, idx, rounds = sys.argv[1:3], sys.argv[3], int(sys.argv[4])
for r in range(rounds):
    run(IndexConfig(embeddings=stores[r % 2], output=idx))
"""


def test_query_while_index_writes_never_crashes_or_mixes_tables(stores, tmp_path):
    """The old cache raised AssertionError here: the two sides deleted each other's files."""
    from cirkit.search import open_index

    ids, (e0, e1) = stores
    idx = tmp_path / "idx"
    ok(["index", str(e0), "-o", str(idx)])
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(e0), str(e1), str(idx), "8"], env=cli_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    q = np.random.default_rng(9).standard_normal((3, 32)).astype(np.float32)
    searches, versions = 0, set()
    known = set(ids)
    try:
        while writer.poll() is None or searches < 3:
            ix = open_index(idx)
            versions.add(ix.version)
            for hits in ix.search(q, k=5, strategy="exact"):
                assert len(hits) == 5 and {h.id for h in hits} <= known
            searches += 1
    finally:
        _finish(writer)
    assert len(versions) >= 2, "the reader never overlapped the writer"
    ix = open_index(idx)
    names = sorted(p.name for p in (idx / "images.cache").iterdir() if not p.name.startswith("."))
    assert f"{ix.cache_key}.vectors.npy" in names and not [n for n in names if ".cirkit-tmp-" in n]


_READER = """
import sys, numpy as np
from cirkit.search import open_index
ix = open_index(sys.argv[1])
print(",".join(h.id for h in ix.search(np.ones(32, np.float32), k=3)[0]))
"""


def test_readers_building_one_cache_at_once_agree(stores, tmp_path):
    import shutil

    ids, (e0, _) = stores
    idx = tmp_path / "idx"
    ok(["index", str(e0), "-o", str(idx)])
    shutil.rmtree(idx / "images.cache")
    readers = [subprocess.Popen([sys.executable, "-c", _READER, str(idx)], env=cli_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [r.communicate(timeout=300) for r in readers]
    assert all(r.returncode == 0 for r in readers), [o[1][-1500:] for o in outs]
    assert len({o[0] for o in outs}) == 1
    names = sorted(p.name for p in (idx / "images.cache").iterdir() if not p.name.startswith("."))
    assert len(names) == 2 and names[0].endswith(".rows.arrow") and names[1].endswith(".vectors.npy")


def test_index_json_is_parseable_and_reports_the_built_ann(stores, tmp_path):
    ids, (e0, _) = stores
    r = invoke(["-q", "index", str(e0), "-o", str(tmp_path / "idx"), "--ann", "--num-partitions", "5", "--json"])
    assert r.exit_code == 0, r.stderr
    ann = json.loads(r.stdout)["details"]["ann"]
    assert ann["num_partitions"] == 5 and ann["rows_at_build"] == N_ROWS and ann["recorded"] is True
