#!/usr/bin/env bash
# Where should stage-2 triplets come from? Same images, same caption pairs, same stage-1 model,
# same steps; only the instruction writer differs:
#   SmolLM2-135M (LLM, the quick start's triplets) | rule-based template | the exact synth edits
# plus the stage-1-only model (composed query without stage 2).
#
# Usage:  commands/triplet_sources.sh [QUICKSTART_OUT]     (default runs/quickstart)
#         Run commands/quickstart.sh first: this reuses its captions, SmolLM2 triplets and stage 1.
#         All three stage-2 models are trained here with the same settings; the batch is smaller
#         than the quick start's because the template writer keeps few of these pairs.
# Env:    PAIRS (256, as in quickstart.sh), S2_STEPS (400), COMB_STEPS (150), BATCH (32), RECIPE, CIRKIT.
set -euo pipefail
QS=${1:-runs/quickstart}
S2_STEPS=${S2_STEPS:-400}
COMB_STEPS=${COMB_STEPS:-150}
BATCH=${BATCH:-32}
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
RECIPE=${RECIPE:-$HERE/recipes/vit-synth-cpu.yaml}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=$QS/sources
mkdir -p "$OUT"
[ -f "$QS/model/config.json" ] || { echo "run commands/quickstart.sh $QS first" >&2; exit 1; }
PAIRS=${PAIRS:-256}  # as in quickstart.sh
# The exact synth edits, as many as the pairs drawn (an upper bound on instruction quality).
# (kept beside the synth triplets: image paths in a JSONL resolve relative to its folder)
EXACT=$QS/synth/triplets-first$PAIRS.jsonl
head -n "$PAIRS" "$QS/synth/triplets.jsonl" > "$EXACT"

# The template writer on the same caption pairs (same pairing settings and seed as the LLM run).
$CIRKIT -q reformulate "$QS/captions.jsonl" -o "$OUT/triplets-template.jsonl" \
    -c "$HERE/recipes/reformulate-smollm2.yaml" --generator template -n "$PAIRS" --json > "$OUT/template.reformulate.json"

train() {  # train NAME ARGS...
  local name=$1; shift
  train_resumable "$OUT/$name" -c "$RECIPE" --batch-size "$BATCH" "$@" > /dev/null
}
for src in smollm2 template exact; do
  case $src in smollm2) data=$QS/triplets.jsonl ;; template) data=$OUT/triplets-template.jsonl ;; exact) data=$EXACT ;; esac
  train "$src-s2" "$data" --stage 2 --init "$QS/stage1" --max-steps "$S2_STEPS"
  train "$src" "$data" --stage combiner --init "$OUT/$src-s2" --max-steps "$COMB_STEPS"
done

evaluate() {  # evaluate NAME CKPT
  [ -f "$OUT/metrics-$1.json" ] || $CIRKIT -q evaluate synth -d "$QS/synth/benchmark" -m "$2" --mode composed \
      -o "$OUT/metrics-$1.json" > /dev/null
}
evaluate stage1 "$QS/stage1"
evaluate smollm2 "$OUT/smollm2"
evaluate template "$OUT/template"
evaluate exact "$OUT/exact"

python - "$QS" "$PAIRS" <<'PY'
import json, sys
from pathlib import Path
qs = Path(sys.argv[1]); out = qs / "sources"
count = lambda p: sum(1 for _ in open(p))
rows = [("stage 1 only", "stage1", None), ("SmolLM2-135M triplets", "smollm2", qs / "triplets.jsonl"),
        ("template triplets", "template", out / "triplets-template.jsonl"),
        ("exact synth edits", "exact", qs / "synth" / f"triplets-first{sys.argv[2]}.jsonl")]
cols = [(s, k) for s in ("test", "compositional") for k in ("R@1", "R@10", "R@50")]
print(f"{'stage-2 training data':24s}{'triplets':>9s}" + "".join(f"{(s[:4] + '.' if s == 'compositional' else s) + ' ' + k:>11s}" for s, k in cols))
for label, name, path in rows:
    m = json.loads((out / f"metrics-{name}.json").read_text())
    n = count(path) if path else 0
    print(f"{label:24s}{n:9d}" + "".join(f"{m[f'composed/{s}/{k}']:11.1f}" for s, k in cols))
PY
