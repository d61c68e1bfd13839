"""benchmarks/gpu/gpu_figures.py runs end to end on the CPU (--smoke), so a lent GPU yields numbers at once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_figures_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "gpu_figures.py"), "--smoke", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    row = figures["models"]["cirkit-tiny"]
    assert figures["smoke"] is True and all(row[k] > 0 for k in ("model_only", "embed_gpu_decode", "embed_cpu_decode"))
    assert figures["train"]["samples_per_s"] > 0
    assert "samples/s" in proc.stdout and "embed, GPU decode" in proc.stdout
