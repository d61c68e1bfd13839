#!/usr/bin/env bash
# The seed paper's ablation on the synth benchmark, printed side by side:
#   full (stage 1 -> stage 2 -> combiner) | no EMA | no cross-attention | no combiner | stage 1 only
# plus the image-only, text-only and image+text-sum baselines of the same stage-1 model.
# Every row uses the same data, seed and step counts; only the switch named by the row differs.
#
# Usage:  commands/ablation.sh [OUT] [RECIPE]
#         (default OUT=runs/ablation, RECIPE=recipes/vit-synth-cpu.yaml: ~10 min on 2 CPU cores)
# Env:    S1_STEPS (600), S2_STEPS (recipe), COMB_STEPS (150), SYNTH_ARGS (extra `cirkit synth` flags),
#         EVAL_ARGS (extra `cirkit evaluate` flags), CIRKIT (command, default `cirkit`).
# Re-running reuses finished stages (a stage folder with config.json is kept).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
OUT=${1:-runs/ablation}
RECIPE=${2:-$HERE/recipes/vit-synth-cpu.yaml}
S1_STEPS=${S1_STEPS:-600}
COMB_STEPS=${COMB_STEPS:-150}
# On shared CPUs torch's OpenMP threads spin when cores are oversubscribed (~10x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SYNTH=$OUT/synth
mkdir -p "$OUT/eval"
start=$(date +%s)

[ -f "$SYNTH/benchmark/meta.json" ] || $CIRKIT -q synth "$SYNTH" ${SYNTH_ARGS:-}

train() {  # train NAME ARGS...: skip if the checkpoint exists
  local name=$1; shift
  if [ -s "$OUT/$name.train.json" ] && [ -f "$OUT/$name/config.json" ]; then return; fi
  rm -rf "$OUT/$name"
  $CIRKIT -q train -c "$RECIPE" -o "$OUT/$name" --json "$@" > "$OUT/$name.train.json"
}
train stage1 "$SYNTH/captions.jsonl" --stage 1 --max-steps "$S1_STEPS"
# ${S2[@]+"${S2[@]}"}: an empty array under `set -u` is an error in bash < 4.4 (macOS's 3.2)
S2=(); [ -n "${S2_STEPS:-}" ] && S2=(--max-steps "$S2_STEPS")
train full-s2    "$SYNTH/triplets.jsonl" --stage 2 --init "$OUT/stage1" ${S2[@]+"${S2[@]}"}
train noema-s2   "$SYNTH/triplets.jsonl" --stage 2 --init "$OUT/stage1" --no-ema ${S2[@]+"${S2[@]}"}
train noxattn-s2 "$SYNTH/triplets.jsonl" --stage 2 --init "$OUT/stage1" --no-cross-attn ${S2[@]+"${S2[@]}"}
for v in full noema noxattn; do
  train "$v-comb" "$SYNTH/triplets.jsonl" --stage combiner --init "$OUT/$v-s2" --max-steps "$COMB_STEPS"
done

evaluate() {  # evaluate NAME CKPT MODES...
  local name=$1 ckpt=$2; shift 2
  local modes=(); for m in "$@"; do modes+=(--mode "$m"); done
  [ -f "$OUT/eval/$name.json" ] || $CIRKIT -q evaluate synth -d "$SYNTH/benchmark" -m "$ckpt" "${modes[@]}" \
    -o "$OUT/eval/$name.json" ${EVAL_ARGS:-} > /dev/null
}
evaluate stage1 "$OUT/stage1" composed image text sum
evaluate full "$OUT/full-comb" composed
evaluate noema "$OUT/noema-comb" composed
evaluate noxattn "$OUT/noxattn-comb" composed
evaluate nocomb "$OUT/full-s2" composed

python - "$OUT" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path
out, seconds = Path(sys.argv[1]), sys.argv[2]
ev = lambda n: json.loads((out / "eval" / f"{n}.json").read_text())
cols = [("test", "R@1"), ("test", "R@10"), ("compositional", "R@1"), ("compositional", "R@10")]
rows = [("full (s1 + s2 + combiner)", "full", "composed"), ("no EMA", "noema", "composed"),
        ("no cross-attention", "noxattn", "composed"), ("no combiner", "nocomb", "composed"),
        ("stage 1 only (composed)", "stage1", "composed"), ("stage 1: image only", "stage1", "image"),
        ("stage 1: text only", "stage1", "text"), ("stage 1: image+text sum", "stage1", "sum")]
head = f"{'variant':28s}" + "".join(f"{s[:5] + ' ' + m:>12s}" for s, m in cols)
print(head); print("-" * len(head))
for label, name, mode in rows:
    m = ev(name)
    print(f"{label:28s}" + "".join(f"{m[f'{mode}/{s}/{k}']:12.1f}" for s, k in cols))
steps = {n: json.loads((out / f"{n}.train.json").read_text())["counts"]["steps"]
         for n in ("stage1", "full-s2", "noema-s2", "noxattn-s2", "full-comb") if (out / f"{n}.train.json").exists()}
print(f"\nsteps: {steps}; wall time of this run: {seconds}s (stages reused from earlier runs not counted)")
PY
