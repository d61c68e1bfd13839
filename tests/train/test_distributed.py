"""Two CPU processes (gloo) train in lockstep: gradients and weights stay identical."""

import json
import os
import socket
import subprocess
import sys

import pytest

from .conftest import tiny_config


@pytest.mark.slow
def test_two_processes_keep_gradients_and_weights_in_sync(synth_dir, tmp_path):
    from cirkit.train import run

    run(tiny_config(synth_dir, tmp_path / "s1", stage=1, max_steps=1))
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(
        "train:\n  model: cirkit-tiny\n  max_steps: 2\n  batch_size: 4\n  num_workers: 0\n  warmup_steps: 1\n"
        "  log_every: 1\n  save_every: 0\n"
    )
    # The loop compares gradient and weight checksums across processes each step (a test-only switch).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIRKIT_CHECK_SYNC": "1"}
    with socket.socket() as sock:  # a free port: parallel runs must not share a rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    # torchrun is what `accelerate launch --multi_gpu` uses; with no GPU the loop picks gloo.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "cirkit", "-q", "train", str(synth_dir / "triplets.jsonl"), "--stage", "2",
           "--init", str(tmp_path / "s1"), "-c", str(recipe), "-o", str(tmp_path / "ddp"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(summaries) == 1  # only the main process prints
    s = summaries[0]
    assert s["details"]["processes"] == 2 and s["details"]["replicas_in_sync"] is True
    assert s["counts"]["samples"] == 2 * 4 * 2
    assert (tmp_path / "ddp" / "model.safetensors").exists()
