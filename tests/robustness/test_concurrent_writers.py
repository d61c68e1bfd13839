"""Two real ``cirkit`` processes on one JSONL output: the second fails at once naming the first, or
(``wait``) queues behind it; either way every record ends up in the output exactly once.

Before the output locks, two ``caption``/``reformulate`` runs on one output wrote every record twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from cirkit.io.lock import is_locked  # noqa: E402

from .conftest import cli_env, complete_lines, ok, png_folder, read_lines, spawn  # noqa: E402

N_IMAGES = 60
N_PAIRS = 60


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from cirkit.testing import build_tiny_causal_lm, build_tiny_llava

    root = tmp_path_factory.mktemp("writers")
    images = png_folder(root / "images", N_IMAGES, size=16)
    captions = root / "captions.jsonl"
    with open(captions, "w") as fh:
        for i in range(N_IMAGES):
            fh.write(json.dumps({"id": f"im{i:03d}", "image": f"images/im{i:03d}.png",
                                 "caption": f"a shape number {i} in colour {i * 7 % 11}"}) + "\n")
    return {"llava": str(build_tiny_llava(root / "llava")), "lm": str(build_tiny_causal_lm(root / "lm")),
            "images": images, "captions": captions}


def _when_locked(proc: subprocess.Popen, out: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_locked(out):
        if proc.poll() is not None:
            pytest.fail(f"the first run ended before it took the lock: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the first run never took its output's lock")
        time.sleep(0.02)


def _cli(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cirkit", "-q", *args], env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stderr.close()


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_a_second_caption_run_fails_at_once_naming_the_first(models, tmp_path):
    out = tmp_path / "captions.jsonl"
    args = ["caption", str(models["images"]), "-o", str(out), "-m", models["llava"], "--batch-size", "1",
            "--num-workers", "0", "--max-new-tokens", "16", "--device", "cpu"]
    first = spawn(args)
    try:
        _when_locked(first, out)
        t0 = time.monotonic()
        line = _one_error_line(_cli(args))
        assert time.monotonic() - t0 < 60
        assert first.poll() is None, "the first run finished before the second tried: the test proves nothing"
        assert line.startswith(f"error: {out}: another cirkit run is writing this captions file (pid {first.pid} on ")
        assert "--wait" in line
    finally:
        _stop(first)
    # the first was killed part-way: the same command resumes it, each image once
    ok(args)
    ids = [r["id"] for r in read_lines(out)]
    assert len(ids) == len(set(ids)) == N_IMAGES


def test_a_run_writing_into_the_first_runs_rejected_file_fails_too(models, tmp_path):
    out = tmp_path / "triplets.jsonl"
    first = spawn(["reformulate", str(models["captions"]), "-o", str(out), "-m", models["lm"], "-n", str(N_PAIRS),
                   "--batch-size", "1", "--max-new-tokens", "8", "--device", "cpu"])
    try:
        _when_locked(first, out)
        rejected = tmp_path / "triplets.rejected.jsonl"
        line = _one_error_line(_cli(["reformulate", str(models["captions"]), "-o", str(rejected), "-g", "template"]))
        assert first.poll() is None, "the first run finished before the second tried: the test proves nothing"
        assert line.startswith(f"error: {rejected}: another cirkit run is writing this ")
        assert f"(pid {first.pid} on " in line
    finally:
        _stop(first)


WAITING = """
import json, sys
from pathlib import Path
from cirkit.reformulate import ReformulateConfig, run

cfg = ReformulateConfig(captions=Path(sys.argv[1]), output=Path(sys.argv[2]), model=sys.argv[3], count=int(sys.argv[4]),
                        batch_size=1, max_new_tokens=8, device="cpu")
cfg.wait = True  # the --wait flag's setting
r = run(cfg)
print(json.dumps({"counts": r.counts, "details": {k: v for k, v in r.details.items() if k != "generator"}}))
"""


def test_a_second_run_with_wait_queues_and_every_pair_is_written_once(models, tmp_path):
    from cirkit.reformulate import rejected_path

    out = tmp_path / "triplets.jsonl"
    first = spawn(["reformulate", str(models["captions"]), "-o", str(out), "-m", models["lm"], "-n", str(N_PAIRS),
                   "--batch-size", "1", "--max-new-tokens", "8", "--device", "cpu"])
    try:
        _when_locked(first, out)
        second = subprocess.Popen([sys.executable, "-c", WAITING, str(models["captions"]), str(out), models["lm"],
                                   str(N_PAIRS)], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        stdout, stderr = second.communicate(timeout=300)
        assert second.returncode == 0, stderr
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
    finally:
        _stop(first)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["details"]["nothing_to_do"] is True  # it waited for the first, which did everything
    assert summary["counts"]["already_done"] == N_PAIRS and summary["counts"]["generated"] == 0
    lines = read_lines(out) + read_lines(rejected_path(out))
    assert sum(complete_lines(p) for p in (out, rejected_path(out))) == N_PAIRS
    assert len({r["id"] for r in lines}) == N_PAIRS
