#!/usr/bin/env bash
# Where should stage-2 triplets come from? Two questions on the quick start's own data:
#  1. Instruction writers on held-out caption pairs (none a seed pair of the tuned model): items/s and
#     instruction accuracy against the true synth edit (cirkit.instruction_score: value, object, kind;
#     "correct" = all three) for SmolLM2-135M zero-shot (reformulate's default prompt + 3 worked examples),
#     the LoRA-tuned SmolLM2 (the quick start's writer) on transformers and on llama.cpp
#     (--engine llama-cpp, when llama-cpp-python is installed), and the rule-based template.
#  2. Downstream recall: stage 2 + combiner retrained from the quick start's stage 1 on the tuned
#     model's triplets (the quick start's model), the template's on the same pairs, and as many
#     exact synth edits (an upper bound on instruction quality).
#
# Usage:  commands/triplet_sources.sh [QUICKSTART_OUT]     (default runs/quickstart)
#         Run commands/quickstart.sh first: this reuses its captions, reformulator, triplets and stage 1.
# Env:    ACC_PAIRS (200) pairs each writer writes for in part 1, PAIRS (1000, as in quickstart.sh),
#         S2_STEPS (400), COMB_STEPS (150), RECIPE, CIRKIT.
set -euo pipefail
QS=${1:-runs/quickstart}
ACC_PAIRS=${ACC_PAIRS:-200}
PAIRS=${PAIRS:-1000}
S2_STEPS=${S2_STEPS:-400}
COMB_STEPS=${COMB_STEPS:-150}
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
RECIPE=${RECIPE:-$HERE/recipes/vit-synth-cpu.yaml}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=$QS/sources
mkdir -p "$OUT"
[ -f "$QS/model/config.json" ] || { echo "run commands/quickstart.sh $QS first" >&2; exit 1; }
TUNED=$HERE/recipes/reformulate-smollm2-tuned.yaml

# ---- 1. writers on the same kind of pairs (close, none a seed pair), each timed in this run
write() {  # write NAME RECIPE ARGS...: reformulate ACC_PAIRS pairs, keep its JSON summary (elapsed seconds)
  local name=$1 recipe=$2; shift 2
  if [ ! -f "$OUT/$name.reformulate.json" ]; then
    $CIRKIT -q reformulate "$QS/captions.jsonl" -o "$OUT/acc-$name.jsonl" -c "$recipe" -n "$ACC_PAIRS" "$@" \
        --json > "$OUT/$name.reformulate.json.tmp"
    mv "$OUT/$name.reformulate.json.tmp" "$OUT/$name.reformulate.json"
  fi
}
write tuned-hf "$TUNED" -m "$QS/reformulator"
if python -c "import llama_cpp" 2>/dev/null; then write tuned-llama-cpp "$TUNED" -m "$QS/reformulator" --engine llama-cpp; fi
# zero-shot: the default model with reformulate's default prompt and worked examples, pairs drawn by the
# same rule and seed (it has no seed pairs to leave out: every pair is held out for it)
write zero-shot-hf "$HERE/recipes/reformulate-smollm2.yaml" --pairing close --max-word-changes 1
write template "$TUNED" --generator template

# ---- 2. downstream: stage 2 + combiner from the quick start's stage 1
EXACT=$QS/synth/triplets-exact.jsonl  # as many exact edits as the tuned model wrote, after the seed edits
SEEDS=$(wc -l < "$QS/seed-edits.jsonl")
N=$(wc -l < "$QS/triplets.jsonl")
[ -s "$EXACT" ] || tail -n +"$((SEEDS + 1))" "$QS/synth/triplets.jsonl" | head -n "$N" > "$EXACT"
[ -f "$OUT/triplets-template.jsonl" ] || $CIRKIT -q reformulate "$QS/captions.jsonl" -o "$OUT/triplets-template.jsonl" \
    -c "$TUNED" --generator template -n "$PAIRS" > /dev/null
finished() { python -c "import json,sys; s=json.load(open(sys.argv[1])); sys.exit(s['step'] < s['max_steps'])" \
    "$1/trainer_state/state.json" 2>/dev/null; }
train() {  # train NAME ARGS...
  local name=$1; shift
  finished "$OUT/$name" || train_resumable "$OUT/$name" -c "$RECIPE" "$@" > /dev/null
}
for src in template exact; do
  case $src in template) data=$OUT/triplets-template.jsonl ;; exact) data=$EXACT ;; esac
  train "$src-s2" "$data" --stage 2 --init "$QS/stage1" --max-steps "$S2_STEPS"
  train "$src" "$data" --stage combiner --init "$OUT/$src-s2" --max-steps "$COMB_STEPS"
done
evaluate() {  # evaluate NAME CKPT
  [ -f "$OUT/metrics-$1.json" ] || $CIRKIT -q evaluate synth -d "$QS/synth/benchmark" -m "$2" --mode composed \
      -o "$OUT/metrics-$1.json" > /dev/null
}
evaluate stage1 "$QS/stage1"
evaluate tuned "$QS/model"
evaluate template "$OUT/template"
evaluate exact "$OUT/exact"

python - "$QS" "$EXACT" <<'PY'
import json, sys
from pathlib import Path
from cirkit.instruction_score import score_triplet, summarize
qs = Path(sys.argv[1]); out = qs / "sources"
print(f"\n{'instruction writer (held-out pairs)':40s}{'pairs':>6s}{'kept':>6s}{'items/s':>9s}"
      f"{'correct':>9s}{'value':>7s}{'object':>8s}{'kind':>6s}")
for label, name in (("SmolLM2-135M zero-shot (3 examples)", "zero-shot-hf"), ("SmolLM2-135M LoRA-tuned, hf", "tuned-hf"),
                    ("SmolLM2-135M LoRA-tuned, llama.cpp", "tuned-llama-cpp"), ("rule-based template", "template")):
    summary = out / f"{name}.reformulate.json"
    if not summary.exists() or not summary.read_text().strip():
        print(f"{label:40s}   (not run{': pip install llama-cpp-python' if 'llama' in name else ''})")
        continue
    s = json.loads(summary.read_text().strip().splitlines()[-1])
    c = s["counts"]
    recs = [json.loads(x) for p in (out / f"acc-{name}.jsonl", out / f"acc-{name}.rejected.jsonl") if p.exists()
            for x in open(p)]
    # every pair counts: a rejected output is a wrong instruction
    a = summarize([score_triplet({**r, "instruction": r.get("instruction", "")}) for r in recs])
    print(f"{label:40s}{c['generated']:6d}{c['written']:6d}{c['generated'] / s['seconds']:9.2f}"
          f"{a['correct']:9.3f}{a['value']:7.3f}{a['object']:8.3f}{a['kind']:6.3f}")
count = lambda p: sum(1 for _ in open(p))
rows = [("stage 1 only", "stage1", None), ("LoRA-tuned SmolLM2 (quick start)", "tuned", qs / "triplets.jsonl"),
        ("template on the same pairs", "template", out / "triplets-template.jsonl"),
        ("exact synth edits", "exact", Path(sys.argv[2]))]
cols = [(s, k) for s in ("test", "compositional") for k in ("R@1", "R@10", "R@50")]
print(f"\n{'stage-2 training data':34s}{'triplets':>9s}" + "".join(f"{(s[:4] + '.' if s == 'compositional' else s) + ' ' + k:>11s}" for s, k in cols))
for label, name, path in rows:
    m = json.loads((out / f"metrics-{name}.json").read_text())
    n = count(path) if path else 0
    print(f"{label:34s}{n:9d}" + "".join(f"{m[f'composed/{s}/{k}']:11.1f}" for s, k in cols))
PY
