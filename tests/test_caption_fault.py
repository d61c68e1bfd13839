"""kill -9 a running `cirkit caption` and `cirkit reformulate`, re-run, compare with an uninterrupted run.

Both stages run as real CLI subprocesses on tiny random models saved to a temp folder
(batch size 1 so there are many appends to interrupt). The two stages run side by side to
keep the wall time down. After the kill and a re-run, the output must hold exactly the ids
of an uninterrupted in-process run, each once, every line valid JSON, same texts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from cirkit.caption import CaptionConfig  # noqa: E402
from cirkit.caption import run as run_caption  # noqa: E402
from cirkit.generation import build_tiny_causal_lm, build_tiny_llava  # noqa: E402
from cirkit.reformulate import ReformulateConfig, rejected_path  # noqa: E402
from cirkit.reformulate import run as run_reformulate  # noqa: E402

N_IMAGES = 24
N_PAIRS = 24
COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), f"{path}: last line is torn"
    return [json.loads(x) for x in raw.decode("utf-8").splitlines()]  # every line must be valid JSON


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cirkit", "-q", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(procs: dict[str, tuple[subprocess.Popen, list[Path]]], at_least: int, timeout: float = 90.0) -> dict:
    """SIGKILL each process once its files hold ``at_least`` complete lines; returns lines seen at kill."""
    seen: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(procs) and time.monotonic() < deadline:
        for name, (proc, files) in procs.items():
            if name in seen:
                continue
            n = sum(_complete_lines(f) for f in files)
            if n >= at_least or proc.poll() is not None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                seen[name] = sum(_complete_lines(f) for f in files)
        time.sleep(0.02)
    for name, (proc, _) in procs.items():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            pytest.fail(f"{name} produced no output in {timeout}s: {proc.stderr.read().decode()[-2000:]}")
    return seen


@pytest.mark.slow
def test_kill_and_resume_is_exactly_once(tmp_path):
    llava = build_tiny_llava(tmp_path / "llava")
    lm = build_tiny_causal_lm(tmp_path / "lm")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        Image.new("RGB", (32 + i % 5, 32), (i * 6 % 256, i * 40 % 256, i * 90 % 256)).save(images / f"im{i:03d}.png")
    captions = tmp_path / "captions.jsonl"
    with open(captions, "w") as fh:
        for i in range(N_IMAGES):
            text = f"a {'small' if i % 2 else 'large'} {COLOURS[i % 5]} {SHAPES[i // 5 % 4]} on a gray background"
            fh.write(json.dumps({"id": f"im{i:03d}", "image": f"images/im{i:03d}.png", "caption": text}) + "\n")

    cap_out, trip_out = tmp_path / "run" / "captions.jsonl", tmp_path / "run" / "triplets.jsonl"
    cap_args = ["caption", str(images), "-o", str(cap_out), "-m", str(llava), "--batch-size", "1",
                "--num-workers", "0", "--max-new-tokens", "12", "--device", "cpu"]
    ref_args = ["reformulate", str(captions), "-o", str(trip_out), "-m", str(lm), "--batch-size", "1", "-n",
                str(N_PAIRS), "--max-new-tokens", "10", "--max-words", "8", "--device", "cpu"]
    seen = _kill_when({
        "caption": (_cli(cap_args), [cap_out]),
        "reformulate": (_cli(ref_args), [trip_out, rejected_path(trip_out)]),
    }, at_least=3)
    assert 0 < seen["caption"] < N_IMAGES, "caption finished before it could be killed"
    assert 0 < seen["reformulate"] < N_PAIRS, "reformulate finished before it could be killed"

    # Re-run both to completion while the uninterrupted reference runs in this process.
    procs = [_cli(cap_args), _cli(ref_args)]
    ref_caps, ref_trips = tmp_path / "ref" / "captions.jsonl", tmp_path / "ref" / "triplets.jsonl"
    run_caption(CaptionConfig(images=images, output=ref_caps, model=str(llava), batch_size=1, num_workers=0,
                              max_new_tokens=12, device="cpu"))
    run_reformulate(ReformulateConfig(captions=captions, output=ref_trips, model=str(lm), batch_size=1,
                                      count=N_PAIRS, max_new_tokens=10, max_words=8, device="cpu"))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]

    got, want = _lines(cap_out), _lines(ref_caps)
    assert len(got) == len({r["id"] for r in got}) == N_IMAGES
    assert {r["id"]: r["caption"] for r in got} == {r["id"]: r["caption"] for r in want}

    got_t, want_t = _lines(trip_out), _lines(ref_trips)
    got_r, want_r = _lines(rejected_path(trip_out)), _lines(rejected_path(ref_trips))
    ids = [r["id"] for r in got_t + got_r]
    assert len(ids) == len(set(ids)) == N_PAIRS
    assert {r["id"]: r["instruction"] for r in got_t} == {r["id"]: r["instruction"] for r in want_t}
    assert {r["id"]: r["reason"] for r in got_r} == {r["id"]: r["reason"] for r in want_r}
