"""caption, reformulate, embed and evaluate under two CPU processes (gloo): the same output as one process, and a
kill of one rank followed by a re-run completes every shard without duplicates.

The runs are real launches: ``accelerate launch --multi_gpu --num_processes 2`` (on a machine
without GPUs accelerate then starts torchrun and the processes form a gloo group) or
``python -m torch.distributed.run``, which is what accelerate runs underneath.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from cirkit.io.embeddings import journal_dir, read_embeddings  # noqa: E402

pytestmark = pytest.mark.slow


def _port() -> str:
    with socket.socket() as sock:  # a free port: parallel runs must not share a rendezvous
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [root, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])}


def _torchrun(args: list[str], n: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", _port(),
            "-m", "cirkit", "-q", *args]


def _accelerate(args: list[str], n: int = 2) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            _port(), "-m", "cirkit", "-q", *args]


def _run(cmd: list[str]) -> dict:
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(summaries) == 1, proc.stdout  # only the main process prints
    return summaries[0]


def _images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (24 + i % 7, 24), (i * 6 % 256, i * 40 % 256, i * 90 % 256)).save(folder / f"im{i:03d}.png")
    return folder


def _kill_rank(launch: subprocess.Popen, ready, pid_of) -> bool:
    """SIGKILL one rank once ``ready()``; True when it was still running then (the launcher then stops the rest)."""
    deadline = time.monotonic() + 300
    while not ready():
        if launch.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run never got far enough to be killed"
        time.sleep(0.02)
    os.kill(pid_of(), signal.SIGKILL)
    launch.wait(timeout=300)
    return True


# -- embed --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    from cirkit.embed import EmbedConfig, run

    root = tmp_path_factory.mktemp("dist-embed")
    images = _images(root / "images", 40)
    run(EmbedConfig(input=images, output=root / "one.lance", backbone="fake", num_workers=0))
    _, ids, _, vecs = read_embeddings(root / "one.lance")
    return images, dict(zip(ids, vecs, strict=True))


def _same_store(path: Path, want: dict) -> None:
    _, ids, _, vecs = read_embeddings(path)  # refuses duplicate ids itself
    assert sorted(ids) == sorted(want)
    got = dict(zip(ids, vecs, strict=True))
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-6


def test_embed_two_processes_equal_one(gallery, tmp_path):
    import lance

    images, want = gallery
    out = tmp_path / "two.lance"
    s = _run(_accelerate(["embed", str(images), "--backbone", "fake", "-o", str(out), "--num-workers", "0",
                          "--batch-size", "4", "--fragment-rows", "8"]))
    assert s["counts"] == {"images": 40, "embedded": 40, "already_stored": 0, "failed": 0}
    assert s["details"]["processes"] == 2
    _same_store(out, want)
    assert lance.dataset(str(out)).version == 2  # created, then one commit of every process's fragments
    assert not journal_dir(out).exists()
    again = _run(_torchrun(["embed", str(images), "--backbone", "fake", "-o", str(out), "--num-workers", "0"]))
    assert again["counts"]["embedded"] == 0 and again["counts"]["already_stored"] == 40


def test_embed_kill_of_one_rank_then_rerun_completes_every_shard_once(gallery, tmp_path):
    images, want = gallery
    out = tmp_path / "k.lance"
    args = ["embed", str(images), "--backbone", "fake", "-o", str(out), "--num-workers", "0", "--batch-size", "1",
            "--fragment-rows", "1"]
    launch = subprocess.Popen(_torchrun(args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journals = lambda: sorted(journal_dir(out).glob("rank-1-*.jsonl")) if journal_dir(out).is_dir() else []  # noqa: E731
    ready = lambda: bool(journals()) and journals()[0].read_text().count("\n") >= 3  # noqa: E731
    pid = lambda: int(journals()[0].stem.rsplit("-", 1)[1])  # noqa: E731 (rank-1-<host>-<pid>)
    assert _kill_rank(launch, ready, pid), "embed finished before a rank could be killed"
    assert launch.returncode != 0
    left = sum(f.read_text().count("\n") for f in journal_dir(out).glob("rank-*.jsonl"))
    assert 3 <= left < 40  # fragments written but never committed: the re-run commits them
    s = _run(_torchrun(args))
    assert s["counts"]["already_stored"] >= left and s["counts"]["images"] == 40
    _same_store(out, want)
    assert not journal_dir(out).exists()


def test_one_process_rerun_commits_what_a_killed_run_journaled(gallery, tmp_path):
    from cirkit.embed import EmbedConfig, run

    images, want = gallery
    out = tmp_path / "j.lance"
    args = ["embed", str(images), "--backbone", "fake", "-o", str(out), "--num-workers", "0", "--batch-size", "1",
            "--fragment-rows", "1"]
    launch = subprocess.Popen(_torchrun(args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journals = lambda: sorted(journal_dir(out).glob("rank-0-*.jsonl")) if journal_dir(out).is_dir() else []  # noqa: E731
    assert _kill_rank(launch, lambda: bool(journals()) and journals()[0].read_text().count("\n") >= 2,
                      lambda: int(journals()[0].stem.rsplit("-", 1)[1]))
    r = run(EmbedConfig(input=images, output=out, backbone="fake", num_workers=0))  # one process resumes it
    assert r.counts["already_stored"] >= 2 and r.counts["embedded"] + r.counts["already_stored"] == 40
    _same_store(out, want)


# -- evaluate ------------------------------------------------------------------------------------
def test_evaluate_two_processes_equal_one(synth_dir, tmp_path):
    from cirkit.evaluate import EvaluateConfig, run

    data = synth_dir / "benchmark" / "test"
    one = run(EvaluateConfig(benchmark="generic", data=data, backbone="fake", num_workers=0,
                             mode=["composed", "image", "text"])).metrics
    out = tmp_path / "metrics.json"
    s = _run(_torchrun(["evaluate", "generic", "-d", str(data), "--backbone", "fake", "--num-workers", "0",
                        "--mode", "composed", "--mode", "image", "--mode", "text", "-o", str(out)]))
    assert s["metrics"] == one and s["details"]["processes"] == 2
    assert json.loads(out.read_text()) == one


# -- caption ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    from cirkit.caption import CaptionConfig, run
    from cirkit.testing import build_tiny_blip

    root = tmp_path_factory.mktemp("dist-caption")
    blip = str(build_tiny_blip(root / "blip"))
    images = _images(root / "images", 12)
    run(CaptionConfig(images=images, output=root / "one.jsonl", model=blip, num_workers=0, max_new_tokens=6,
                      device="cpu", batch_size=2))
    return blip, images, {r["id"]: r["caption"] for r in map(json.loads, (root / "one.jsonl").read_text().splitlines())}


def _captions(path: Path) -> dict[str, str]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: r["caption"] for r in rows}


def test_caption_two_processes_equal_one(captioned, tmp_path):
    blip, images, want = captioned
    out = tmp_path / "two.jsonl"
    s = _run(_torchrun(["caption", str(images), "-o", str(out), "-m", blip, "--num-workers", "0",
                        "--max-new-tokens", "6", "--device", "cpu", "--batch-size", "2"]))
    assert s["counts"]["captioned"] == 12 and s["counts"]["merged_from_parts"] == 12
    assert _captions(out) == want
    assert not list(tmp_path.glob("two.jsonl.part-*"))


def test_caption_kill_of_one_rank_then_rerun_is_exactly_once(captioned, tmp_path):
    blip, images, want = captioned
    out = tmp_path / "k.jsonl"
    args = ["caption", str(images), "-o", str(out), "-m", blip, "--num-workers", "0", "--max-new-tokens", "6",
            "--device", "cpu", "--batch-size", "1"]
    launch = subprocess.Popen(_torchrun(args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = tmp_path / "k.jsonl.part-1"
    holder = tmp_path / ".k.jsonl.part-1.lock"  # the part's single-writer lock names the rank's pid
    assert _kill_rank(launch, lambda: part.exists() and part.read_text().count("\n") >= 1,
                      lambda: json.loads(holder.read_text())["pid"]), "caption finished before a rank could be killed"
    assert not out.exists() or len(_captions(out)) < 12
    _run(_torchrun(args))  # two processes again: the leftovers are counted done and merged
    assert _captions(out) == want
    assert not list(tmp_path.glob("k.jsonl.part-*"))


# -- reformulate --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reformulated(synth_dir, tmp_path_factory):
    """synth's captions, a tiny causal LM, and one process's triplets and rejects with it."""
    from cirkit.caption import import_captions
    from cirkit.reformulate import ReformulateConfig, run
    from cirkit.testing import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("dist-reformulate")
    caps = root / "captions.jsonl"
    import_captions(synth_dir / "captions.jsonl", caps)
    lm = str(build_tiny_causal_lm(root / "lm"))
    args = ["--count", "16", "--max-new-tokens", "3", "--batch-size", "1", "--device", "cpu", "--max-words", "50"]
    run(ReformulateConfig(captions=caps, output=root / "one.jsonl", model=lm, count=16, max_new_tokens=3,
                          batch_size=1, device="cpu", max_words=50))
    return caps, lm, args, _records(root / "one.jsonl"), _records(root / "one.rejected.jsonl")


def _records(path: Path) -> dict[str, dict]:
    """The records of a JSONL by id (each id once), without the fields that name the run."""
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"{path}: an id was written twice"
    return {r["id"]: {k: v for k, v in r.items() if k != "generator"} for r in rows}


def test_reformulate_two_processes_equal_one(reformulated, tmp_path):
    caps, lm, args, want, want_rejected = reformulated
    out = tmp_path / "two.jsonl"
    s = _run(_torchrun(["reformulate", str(caps), "-o", str(out), "-m", lm, *args]))
    assert s["counts"]["generated"] == 16 and s["details"]["processes"] == 2
    assert s["counts"]["written"] == len(want) and len(want) + len(want_rejected) == 16
    assert _records(out) == want and _records(tmp_path / "two.rejected.jsonl") == want_rejected
    assert not list(tmp_path.glob("*.part-*"))


def test_reformulate_kill_of_one_rank_then_rerun_is_exactly_once(reformulated, tmp_path):
    caps, lm, args, want, want_rejected = reformulated
    out = tmp_path / "k.jsonl"
    cmd = ["reformulate", str(caps), "-o", str(out), "-m", lm, *args]
    launch = subprocess.Popen(_torchrun(cmd), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = [tmp_path / "k.jsonl.part-1", tmp_path / "k.rejected.jsonl.part-1"]
    holder = tmp_path / ".k.jsonl.part-1.lock"  # the part's single-writer lock names the rank's pid
    assert _kill_rank(launch, lambda: sum(p.read_text().count("\n") for p in parts if p.exists()) >= 1,
                      lambda: json.loads(holder.read_text())["pid"]), "reformulate finished before a rank was killed"
    assert len(_records(out)) + len(_records(tmp_path / "k.rejected.jsonl")) < 16
    s = _run(_torchrun(cmd))  # the leftovers count as done and are merged; every shard continues
    assert s["counts"]["already_done"] >= 1
    assert _records(out) == want and _records(tmp_path / "k.rejected.jsonl") == want_rejected
    assert not list(tmp_path.glob("*.part-*"))


def test_reformulate_bad_group_depth_is_one_line_on_every_rank(tmp_path):
    """Pairing settings are checked where every process draws the pairs: no rank waits on a failed main."""
    caps = tmp_path / "c.jsonl"
    caps.write_text("".join(json.dumps({"id": f"i{k}", "image": f"{k}.png", "caption": f"a thing {k}",
                                        "group": f"women/m{k % 2}/c/p{k}"}) + "\n" for k in range(8)))
    cmd = ["reformulate", str(caps), "-o", str(tmp_path / "t.jsonl"), "-g", "template", "--pairing", "same-group",
           "--group-depth", "5"]
    proc = subprocess.run(_torchrun(cmd), capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 2 and all("--group-depth 5: no caption's group is 5 folders deep" in e for e in errors)
    assert "[rank" not in proc.stderr  # no rank's traceback (a rank left waiting on the main one would have one)
    assert not (tmp_path / "t.jsonl").exists()
