"""Helpers for the robustness suite: real CLI subprocesses to SIGKILL, in-process CLI runs, tiny inputs.

A killed run is always a real ``python -m cirkit ...`` process; the re-run and the
uninterrupted reference run in this process (same CLI, no second torch import), which
keeps the suite's CPU time down on shared cores.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# Each seed picks a different kill point (complete output lines, commits or training steps).
SEEDS = [0, 1]


@pytest.fixture(autouse=True)
def one_thread():
    """Shared CI cores: one torch thread in this process is faster and deterministic."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli_env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def spawn(args: list[str], cwd: Path | None = None) -> subprocess.Popen:
    """Start ``python -m cirkit -q ARGS`` as a real subprocess."""
    return subprocess.Popen([sys.executable, "-m", "cirkit", "-q", *args], env=cli_env(), cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float = 0.0, timeout: float = 120.0) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` holds; returns whether it was still running.

    A process that exits on its own first is reported (False) so the caller can fail or
    accept it; one that never gets ready within ``timeout`` fails the test.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"not ready after {timeout}s: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    if delay:
        time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not alive and proc.returncode != 0:
        pytest.fail(f"the run failed before it was killed: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return alive


def rng_for(seed: int) -> random.Random:
    return random.Random(1000 + seed)


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def read_lines(path: Path) -> list[dict]:
    """Every line of a JSONL output, asserting none is torn or invalid."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), f"{path}: last line is torn"
    return [json.loads(x) for x in raw.decode("utf-8").splitlines()]


def invoke(args: list[str], cwd: Path | None = None):
    """Run ``cirkit ARGS`` in this process through Typer's CliRunner; returns the click Result."""
    from typer.testing import CliRunner

    from cirkit.cli import app

    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args)
    finally:
        os.chdir(old)


def ok(args: list[str], cwd: Path | None = None) -> dict:
    """Run ``cirkit ARGS --json`` in process, assert exit 0, return the JSON summary."""
    r = invoke(["-q", *args, "--json"], cwd)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    return json.loads(r.stdout.strip().splitlines()[-1])


def fails(args: list[str], code: int = 1, cwd: Path | None = None) -> str:
    """Run ``cirkit ARGS`` in process, assert exit ``code`` with one ``error:`` line; return that line."""
    r = invoke(["-q", *args], cwd)
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr, r.exception)
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def png_folder(folder: Path, n: int, size: int = 32) -> Path:
    """``n`` distinct small PNGs named im000.png ..."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size + i % 5, size), (i * 6 % 256, i * 40 % 256, i * 90 % 256)).save(folder / f"im{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def vit_checkpoint(tmp_path_factory):
    """A real (untrained) cirkit-tiny vit checkpoint folder."""
    from cirkit.backbones import vit

    folder = tmp_path_factory.mktemp("ckpt") / "vit"
    model, _, _ = vit.build_model({"model": "cirkit-tiny", "cross_attn": True, "cross_attn_layers": None,
                                   "predictor_hidden": None, "temperature": 0.07, "null_text": vit.NULL_TEXT})
    vit.save_checkpoint(model, folder)
    return folder


# -- the adversarial layer's shared inputs and checks ------------------------------------------------
def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (without following links): file hashes, link targets, kinds.

    Hidden lock files are left out: a refused run may leave none, but the lock module removes
    them itself, and the contract is about the user's data.
    """
    import hashlib
    import stat

    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            if name.startswith(".") and name.endswith(".lock"):
                continue
            st = os.lstat(p)
            rel = os.fsencode(p.relative_to(root)).decode("utf-8", "backslashreplace")
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link -> " + os.fsencode(os.readlink(p)).decode("utf-8", "backslashreplace")
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
            else:
                out[rel] = f"special {stat.S_IFMT(st.st_mode):o}"
    return out


def refused(args: list[str], roots: list[Path], code: int = 1, cwd: Path | None = None, contains=()) -> str:
    """Run ``cirkit ARGS`` in process: exit ``code``, one ``error:`` line, no traceback, every tree untouched."""
    before = [tree(r) for r in roots]
    line = fails(args, code=code, cwd=cwd)
    for r, b in zip(roots, before, strict=True):
        after = tree(r)
        changed = sorted(k for k in set(b) | set(after) if b.get(k) != after.get(k))
        assert not changed, f"a refused run changed {changed[:5]} under {r}: {line}"
    for part in [contains] if isinstance(contains, str) else contains:
        assert part in line, (part, line)
    return line


@pytest.fixture(scope="session")
def world(tmp_path_factory, vit_checkpoint):
    """One of every input and output kind, made once by real runs: tests must never change it.

    synth/ (benchmark folder), captions.jsonl, triplets.jsonl (+ .rejected), g.lance (fake
    embeddings), idx/ (index + its search cache), ck/ (a vit checkpoint), metrics.json, subs/
    (rankings), r.html, r.png, results.jsonl.
    """
    import shutil

    from cirkit.synth import SynthConfig
    from cirkit.synth import run as synth

    root = tmp_path_factory.mktemp("world")
    synth(SynthConfig(out=root / "synth", seed=0, train_triplets=12, test_queries=6, distractors=4, image_size=32))
    bench = root / "synth" / "benchmark" / "test"
    image = sorted((root / "synth" / "images").iterdir())[0]
    shutil.copytree(vit_checkpoint, root / "ck")
    for args in (
        ["caption", "--from", str(root / "synth" / "captions.jsonl"), "-o", str(root / "captions.jsonl")],
        ["reformulate", str(root / "synth" / "captions.jsonl"), "-g", "template", "-n", "6", "-o",
         str(root / "triplets.jsonl")],
        ["embed", str(root / "synth" / "images"), "--backbone", "fake", "-o", str(root / "g.lance"),
         "--num-workers", "0"],
        ["index", str(root / "g.lance"), "-o", str(root / "idx")],
        ["query", str(image), "make it red", "--index", str(root / "idx"), "--html", str(root / "r.html"),
         "--grid", str(root / "r.png")],
        ["query", "--batch", str(bench / "queries.jsonl"), "--index", str(root / "idx"), "-o",
         str(root / "results.jsonl")],
        ["evaluate", "generic", "-d", str(bench), "--backbone", "fake", "--num-workers", "0", "-o",
         str(root / "metrics.json"), "--submission", str(root / "subs")],
    ):
        ok(args)
    return root
