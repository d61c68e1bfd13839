#!/usr/bin/env bash
# The seed paper's ablations on the synth benchmark, over several training seeds, with 95 %
# intervals (seed paper Table V: EMA, cross-attention; Table IV: the number of triplets):
#   full (stage 1 -> stage 2 -> eq. 3 combiner) | no EMA | no cross-attention | tanh-gated
#   cross-attention (gate_init 0) | no combiner | per-query combiner gate | stage 1 only
#   (+ its image-only, text-only and image+text-sum baselines) | 250 / 1,000 / all triplets.
# Every row uses the same data and step counts; only the switch named by the row differs, and
# each seed trains every row (its own stage 1 included), so rows are compared seed by seed.
# The table (commands/ablation_table.py) gives the mean over seeds and a 95 % bootstrap
# interval that resamples both the test queries and the seeds.
#
# Usage:  commands/ablation.sh [OUT] [RECIPE]
#         (default OUT=runs/ablation, RECIPE=recipes/vit-synth-cpu.yaml; about 17 min per seed on
#         2 CPU cores. One seed at a time, then the table: SEEDS=0 commands/ablation.sh; ...;
#         SEEDS="0 1 2" commands/ablation.sh reuses all three and prints it.)
# Env:    SEEDS ("0 1 2"), TRIPLETS (4000: synth training triplets, the "all" of the curve),
#         CURVE ("250 1000": smaller first-N subsets), S1_STEPS (600), S2_STEPS (recipe),
#         COMB_STEPS (150), SYNTH_ARGS / EVAL_ARGS (extra flags), CIRKIT (command, default `cirkit`).
# Re-running reuses finished stages (a stage folder with config.json is kept).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
OUT=${1:-runs/ablation}
RECIPE=${2:-$HERE/recipes/vit-synth-cpu.yaml}
SEEDS=${SEEDS:-0 1 2}
TRIPLETS=${TRIPLETS:-4000}
CURVE=${CURVE:-250 1000}
S1_STEPS=${S1_STEPS:-600}
COMB_STEPS=${COMB_STEPS:-150}
# On shared CPUs torch's OpenMP threads spin when cores are oversubscribed (~10x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SYNTH=$OUT/synth
mkdir -p "$OUT"
start=$(date +%s)

[ -f "$SYNTH/benchmark/meta.json" ] || $CIRKIT -q synth "$SYNTH" --train-triplets "$TRIPLETS" ${SYNTH_ARGS:-}
for n in $CURVE; do  # the first N triplets (synth writes them in random order); paths stay relative to $SYNTH
  [ -s "$SYNTH/triplets-$n.jsonl" ] || head -n "$n" "$SYNTH/triplets.jsonl" > "$SYNTH/triplets-$n.jsonl"
done

train() {  # train DIR ARGS...: skip if the checkpoint exists
  local dir=$1; shift
  if [ -s "$dir.train.json" ] && [ -f "$dir/config.json" ]; then return; fi
  # no rm: an interrupted run resumes, and cirkit train refuses a folder it did not write
  CIRKIT="$CIRKIT -q" train_resumable "$dir" -c "$RECIPE" --json "$@" > "$dir.train.json"
}

evaluate() {  # evaluate DIR CKPT MODES...: metrics.json + rankings (for the table's per-query bootstrap)
  local dir=$1 ckpt=$2; shift 2
  local modes=(); for m in "$@"; do modes+=(--mode "$m"); done
  [ -f "$dir/metrics.json" ] && return
  mkdir -p "$dir"  # evaluate replaces only its own metrics file and rankings folder
  $CIRKIT -q evaluate synth -d "$SYNTH/benchmark" -m "$ckpt" "${modes[@]}" -o "$dir/metrics.json.tmp" \
    --submission "$dir/rankings" ${EVAL_ARGS:-} > /dev/null
  mv "$dir/metrics.json.tmp" "$dir/metrics.json"
}

# ${S2[@]+"${S2[@]}"}: an empty array under `set -u` is an error in bash < 4.4 (macOS's 3.2)
S2=(); [ -n "${S2_STEPS:-}" ] && S2=(--max-steps "$S2_STEPS")
for seed in $SEEDS; do
  R=$OUT/seed$seed
  mkdir -p "$R"
  train "$R/stage1" "$SYNTH/captions.jsonl" --stage 1 --max-steps "$S1_STEPS" --seed "$seed"
  s2() { train "$R/$1-s2" "$2" --stage 2 --init "$R/stage1" --seed "$seed" ${S2[@]+"${S2[@]}"} "${@:3}"; }
  s2 full "$SYNTH/triplets.jsonl"
  s2 noema "$SYNTH/triplets.jsonl" --no-ema
  s2 noxattn "$SYNTH/triplets.jsonl" --no-cross-attn
  s2 gated "$SYNTH/triplets.jsonl" --gate-init 0
  for n in $CURVE; do s2 "n$n" "$SYNTH/triplets-$n.jsonl"; done
  for v in full noema noxattn gated $(for n in $CURVE; do echo "n$n"; done); do
    train "$R/$v-comb" "$SYNTH/triplets.jsonl" --stage combiner --init "$R/$v-s2" --max-steps "$COMB_STEPS" --seed "$seed"
  done
  train "$R/full-gatecomb" "$SYNTH/triplets.jsonl" --stage combiner --combiner gate --init "$R/full-s2" \
    --max-steps "$COMB_STEPS" --seed "$seed"

  evaluate "$R/eval/stage1" "$R/stage1" composed image text sum
  for v in full noema noxattn gated $(for n in $CURVE; do echo "n$n"; done); do
    evaluate "$R/eval/$v" "$R/$v-comb" composed
  done
  evaluate "$R/eval/nocomb" "$R/full-s2" composed
  evaluate "$R/eval/gatecomb" "$R/full-gatecomb" composed
done

python "$HERE/commands/ablation_table.py" "$OUT" --seeds $SEEDS --curve $CURVE --triplets "$TRIPLETS" \
  --seconds "$(( $(date +%s) - start ))"
