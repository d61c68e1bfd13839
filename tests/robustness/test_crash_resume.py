"""SIGKILL a real ``python -m cirkit`` run at a seeded point, re-run the same command, compare.

For caption, reformulate, embed, index and train: after the kill and a re-run, the
output must equal an uninterrupted run's (same ids, each once, nothing lost, no torn
line; training continues to the same step, loss and weights). Each seed picks a
different kill point: a number of complete output lines, Lance commits or training steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from .conftest import SEEDS, complete_lines, invoke, kill_when, ok, png_folder, read_lines, rng_for, spawn  # noqa: E402

N_IMAGES = 12
N_PAIRS = 12
# Complete output lines after which caption/reformulate are killed, one point per seed (a
# seeded randint drew the same number for both seeds). Other seeds draw one.
KILL_AFTER_LINES = {0: 2, 1: 6}
COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]


# -- caption and reformulate ----------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_inputs(tmp_path_factory):
    """Tiny random llava + causal LM, 12 images and their captions, and the uninterrupted outputs."""
    from cirkit.caption import CaptionConfig
    from cirkit.caption import run as run_caption
    from cirkit.reformulate import ReformulateConfig
    from cirkit.reformulate import run as run_reformulate
    from cirkit.testing import build_tiny_causal_lm, build_tiny_llava

    root = tmp_path_factory.mktemp("gen")
    llava, lm = build_tiny_llava(root / "llava"), build_tiny_causal_lm(root / "lm")
    images = png_folder(root / "images", N_IMAGES)
    captions = root / "captions.jsonl"
    with open(captions, "w") as fh:
        for i in range(N_IMAGES):
            text = f"a {'small' if i % 2 else 'large'} {COLOURS[i % 5]} {SHAPES[i // 5 % 4]} on a gray background"
            fh.write(json.dumps({"id": f"im{i:03d}", "image": f"images/im{i:03d}.png", "caption": text}) + "\n")
    ref_caps, ref_trips = root / "ref" / "captions.jsonl", root / "ref" / "triplets.jsonl"
    run_caption(CaptionConfig(images=images, output=ref_caps, model=str(llava), batch_size=1, num_workers=0,
                              max_new_tokens=8, device="cpu"))
    run_reformulate(ReformulateConfig(captions=captions, output=ref_trips, model=str(lm), batch_size=1,
                                      count=N_PAIRS, max_new_tokens=8, max_words=8, device="cpu"))
    return {"llava": str(llava), "lm": str(lm), "images": images, "captions": captions,
            "ref_caps": ref_caps, "ref_trips": ref_trips}


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_caption_killed_and_rerun_is_exactly_once(gen_inputs, tmp_path, seed):
    rng = rng_for(seed)
    out = tmp_path / "captions.jsonl"
    args = ["caption", str(gen_inputs["images"]), "-o", str(out), "-m", gen_inputs["llava"], "--batch-size", "1",
            "--num-workers", "0", "--max-new-tokens", "8", "--device", "cpu"]
    at = KILL_AFTER_LINES.get(seed) or rng.randint(1, N_IMAGES - 5)
    assert kill_when(spawn(args), lambda: complete_lines(out) >= at, delay=rng.uniform(0, 0.05))
    killed_at = len(read_lines(out))
    assert 0 < killed_at < N_IMAGES, "caption finished before it could be killed"

    ok(args)
    got, want = read_lines(out), read_lines(gen_inputs["ref_caps"])
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)) == N_IMAGES
    assert {r["id"]: r["caption"] for r in got} == {r["id"]: r["caption"] for r in want}
    ok(args)  # a finished output is a no-op
    assert read_lines(out) == got


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_reformulate_killed_and_rerun_is_exactly_once(gen_inputs, tmp_path, seed):
    from cirkit.reformulate import rejected_path

    rng = rng_for(seed)
    out = tmp_path / "triplets.jsonl"
    outs = [out, rejected_path(out)]
    args = ["reformulate", str(gen_inputs["captions"]), "-o", str(out), "-m", gen_inputs["lm"], "--batch-size", "1",
            "-n", str(N_PAIRS), "--max-new-tokens", "8", "--max-words", "8", "--device", "cpu"]
    at = KILL_AFTER_LINES.get(seed) or rng.randint(1, N_PAIRS - 5)
    assert kill_when(spawn(args), lambda: sum(complete_lines(p) for p in outs) >= at, delay=rng.uniform(0, 0.05))
    killed_at = sum(len(read_lines(p)) for p in outs)
    assert 0 < killed_at < N_PAIRS, "reformulate finished before it could be killed"

    ok(args)
    ref = gen_inputs["ref_trips"]
    got_t, want_t = read_lines(out), read_lines(ref)
    got_r, want_r = read_lines(rejected_path(out)), read_lines(rejected_path(ref))
    ids = [r["id"] for r in got_t + got_r]
    assert len(ids) == len(set(ids)) == N_PAIRS
    assert {r["id"]: r["instruction"] for r in got_t} == {r["id"]: r["instruction"] for r in want_t}
    assert {r["id"]: r["reason"] for r in got_r} == {r["id"]: r["reason"] for r in want_r}
    ok(args)
    assert read_lines(out) == got_t and read_lines(rejected_path(out)) == got_r


# -- embed ------------------------------------------------------------------------------------
N_GALLERY = 40


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """40 PNGs and their uninterrupted fake-backbone embeddings."""
    from cirkit.embed import EmbedConfig, run
    from cirkit.io.embeddings import read_embeddings

    root = tmp_path_factory.mktemp("gallery")
    images = png_folder(root / "images", N_GALLERY, size=16)
    run(EmbedConfig(input=images, output=root / "ref.lance", backbone="fake", num_workers=0, batch_size=1))
    _, ids, _, vecs = read_embeddings(root / "ref.lance")
    return images, dict(zip(ids, vecs, strict=True))


def _commits(store: Path) -> int:
    versions = store / "_versions"
    return sum(1 for p in versions.iterdir() if p.suffix == ".manifest") if versions.is_dir() else 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_embed_killed_and_rerun_has_every_id_once(gallery, tmp_path, seed):
    from cirkit.io.embeddings import read_embeddings

    images, want = gallery
    rng = rng_for(seed)
    out = tmp_path / "g.lance"
    # batch size 1: one Lance commit per image (the first commit creates the table)
    args = ["embed", str(images), "--backbone", "fake", "-o", str(out), "--batch-size", "1", "--num-workers", "0"]
    at = rng.randint(2, N_GALLERY // 2)
    assert kill_when(spawn(args), lambda: _commits(out) >= at, delay=rng.uniform(0, 0.05))
    _, ids, _, _ = read_embeddings(out)
    assert 0 < len(ids) < N_GALLERY, "embed finished before it could be killed"
    assert len(ids) == len(set(ids))

    summary = ok(args)
    assert summary["counts"]["already_stored"] == len(ids)
    assert summary["counts"]["embedded"] == N_GALLERY - len(ids)
    _, got_ids, got_images, vecs = read_embeddings(out)
    assert len(got_ids) == len(set(got_ids)) == N_GALLERY
    assert set(got_ids) == set(want)
    assert all(Path(p).is_file() for p in got_images)
    for k, v in zip(got_ids, vecs, strict=True):
        np.testing.assert_array_equal(v, want[k])
    assert ok(args)["counts"]["embedded"] == 0


# -- index ------------------------------------------------------------------------------------
N_ROWS = 3000
DIM = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A 3000 x 32 embeddings store and the index an uninterrupted ``cirkit index --ann`` builds from it."""
    from cirkit.index import IndexConfig, run
    from cirkit.io.embeddings import EmbeddingStore
    from cirkit.records import EmbeddingManifest

    root = tmp_path_factory.mktemp("index")
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((N_ROWS, DIM)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    ids = [f"i{k:05d}" for k in range(N_ROWS)]
    path = root / "e.lance"
    s = EmbeddingStore.open_for_append(path, EmbeddingManifest(backbone="fake", checkpoint="fake", dim=DIM))
    for lo in range(0, N_ROWS, 1000):
        s.append(ids[lo:lo + 1000], [f"img/{i}.png" for i in ids[lo:lo + 1000]], vec[lo:lo + 1000])
    run(IndexConfig(embeddings=path, output=str(root / "ref"), ann=True))
    return path, root / "ref", vec[:5]


def _index_state(uri: Path, queries: np.ndarray):
    from cirkit.search import open_index

    ix = open_index(uri)
    data = ix.table.to_arrow().sort_by("id")
    hits = [[h.id for h in row] for row in ix.search(queries, k=5, strategy="exact")]
    ann = ix.ann_info()
    return (data.column("id").to_pylist(), data.column("vector").to_pylist(), data.column("image").to_pylist(),
            hits, ann and {k: ann[k] for k in ("num_partitions", "num_sub_vectors", "indexed_rows")})


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_index_killed_and_rerun_equals_an_uninterrupted_build(store, tmp_path, seed):
    emb, ref, queries = store
    rng = rng_for(seed)
    out = tmp_path / "idx"
    args = ["index", str(emb), "-o", str(out), "--ann"]
    # The whole run takes ~3.5 s and the ANN training after the table appears ~0.3-0.6 s, so
    # kill as the table appears (seed 0: while its rows are written) or 0.1 s later (seed 1:
    # while the ANN index trains); either way the run must still be going.
    delay = {0: 0.0, 1: 0.1}.get(seed, rng.uniform(0, 0.1))
    assert kill_when(spawn(args), lambda: (out / "images.lance").exists(), delay=delay), "index finished first"

    ok(args)
    want = _index_state(ref, queries)
    assert _index_state(out, queries) == want
    ids = want[0]
    assert len(ids) == len(set(ids)) == N_ROWS
    again = ok(args)  # re-running the same command is a no-op
    assert again["counts"]["added"] == again["counts"]["updated"] == 0
    assert again["counts"]["unchanged"] == N_ROWS
    assert _index_state(out, queries) == want


# -- train ------------------------------------------------------------------------------------
MAX_STEPS = 10


@pytest.fixture(scope="module")
def train_ref(synth_dir, tmp_path_factory):
    """The uninterrupted 10-step stage-1 run the resumed ones must match."""
    from cirkit.train import run
    from cirkit.train.plugin import TrainConfig

    out = tmp_path_factory.mktemp("train") / "ref"
    run(TrainConfig(backbone="vit", stage="1", data=synth_dir / "captions.jsonl", output=out, model="cirkit-tiny",
                    max_steps=MAX_STEPS, batch_size=8, lr=1e-3, warmup_steps=1, num_workers=0, log_every=1,
                    save_every=2))
    return out


def _state_step(out: Path) -> int:
    try:
        return json.loads((out / "trainer_state" / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_train_killed_after_a_save_resumes_to_the_same_result(synth_dir, train_ref, tmp_path, seed):
    import torch
    from safetensors.torch import load_file

    rng = rng_for(seed)
    out = tmp_path / "run"
    args = ["train", str(synth_dir / "captions.jsonl"), "--stage", "1", "--model", "cirkit-tiny", "-o", str(out),
            "--max-steps", str(MAX_STEPS), "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "1",
            "--num-workers", "0", "--log-every", "1", "--save-every", "2"]
    at = rng.choice([2, 4, 6])
    assert kill_when(spawn(args), lambda: _state_step(out) >= at, delay=rng.uniform(0, 0.2)), "train finished first"
    saved = _state_step(out)
    assert at <= saved < MAX_STEPS

    r = invoke([*args, "--resume", "--json"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["counts"]["steps"] == MAX_STEPS
    assert _state_step(out) == MAX_STEPS

    got, want = read_lines(out / "metrics.jsonl"), read_lines(train_ref / "metrics.jsonl")
    assert [m["step"] for m in got] == list(range(1, MAX_STEPS + 1))
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-5), g["step"]
    wa, wb = load_file(str(train_ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    # Nothing in a checkpoint needs unpickling to resume or load: by name and by content.
    from cirkit.checkpoint import weights_format
    from cirkit.io.atomic import MARKER

    files = [p for p in out.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert kinds <= {".safetensors", ".json", ".jsonl"}, kinds
    assert json.loads((out / MARKER).read_text())["kind"] == "checkpoint"
    assert not [p for p in files if weights_format(p) == "pickle"]
