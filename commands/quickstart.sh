#!/usr/bin/env bash
# cirkit's main job end to end, offline, on CPU: a folder of unannotated images becomes training
# triplets, trains the vit backbone from scratch, and is indexed, queried and evaluated.
#
#   synth -> caption --from -> reformulate (SmolLM2) -> train stage 1 -> train stage 2 -> combiner
#         -> embed gallery -> index -> query (HTML contact sheet) -> evaluate vs baselines
#
# Usage:  commands/quickstart.sh [OUT]            (default OUT=runs/quickstart; ~8 min on 2 cores)
# Env:    PAIRS (256) SmolLM2 reformulations, S1_STEPS (600), S2_STEPS (400), COMB_STEPS (150),
#         RECIPE (recipes/vit-synth-cpu.yaml), SYNTH_ARGS (extra `cirkit synth` flags),
#         TRAIN_ARGS (extra `cirkit train` flags), CIRKIT (command, default `cirkit`).
# Every stage resumes: re-running after an interruption continues where it stopped.
set -euo pipefail
OUT=${1:-runs/quickstart}
PAIRS=${PAIRS:-256}
S1_STEPS=${S1_STEPS:-600}
S2_STEPS=${S2_STEPS:-400}
COMB_STEPS=${COMB_STEPS:-150}
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
RECIPE=${RECIPE:-$HERE/recipes/vit-synth-cpu.yaml}
# Oversubscribed torch threads spin on shared CPUs; two threads suit a 2-core machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
start=$(date +%s)
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/9 synth: a procedural image folder with held-out attribute combinations"
[ -f "$OUT/synth/benchmark/meta.json" ] || $CIRKIT synth "$OUT/synth" ${SYNTH_ARGS:-}

step "2/9 caption --from: import the exact synth captions (a real captioner: cirkit caption IMAGES -m MODEL)"
$CIRKIT caption --from "$OUT/synth/captions.jsonl" -o "$OUT/captions.jsonl"

step "3/9 reformulate: SmolLM2-135M-Instruct writes the edit between two similar captions"
$CIRKIT reformulate "$OUT/captions.jsonl" -o "$OUT/triplets.jsonl" \
    -c "$HERE/recipes/reformulate-smollm2.yaml" -n "$PAIRS"

train() {  # train NAME ARGS...: a saved run (finished or interrupted) continues with --resume
  local name=$1; shift
  train_resumable "$OUT/$name" -c "$RECIPE" "$@" ${TRAIN_ARGS:-}
}
step "4/9 train stage 1: image-caption contrastive, from scratch"
train stage1 "$OUT/captions.jsonl" --stage 1 --max-steps "$S1_STEPS"
step "5/9 train stage 2: composed query -> target image on the SmolLM2 triplets"
train stage2 "$OUT/triplets.jsonl" --stage 2 --init "$OUT/stage1" --max-steps "$S2_STEPS"
step "6/9 train combiner: fuse the query with the text embedding, backbone frozen"
train model "$OUT/triplets.jsonl" --stage combiner --init "$OUT/stage2" --max-steps "$COMB_STEPS"

step "7/9 embed + index the test gallery"
GALLERY=$OUT/synth/benchmark/test/gallery.jsonl
$CIRKIT embed --model "$OUT/model" "$GALLERY" -o "$OUT/gallery.lance"
$CIRKIT index "$OUT/gallery.lance" -o "$OUT/index"

step "8/9 query: first test query, HTML contact sheet"
{ read -r REF; read -r TEXT; read -r TARGET; } < <(python - "$OUT/synth/benchmark/test/queries.jsonl" <<'PY'
import json, sys
from pathlib import Path
path = Path(sys.argv[1])
q = json.loads(path.read_text().splitlines()[0])
print((path.parent / q["reference"]).resolve(), q["text"], q["targets"][0], sep="\n")
PY
)
echo "reference: $REF"; echo "text:      $TEXT"; echo "target:    $TARGET"
$CIRKIT query "$REF" "$TEXT" --index "$OUT/index" -k 5 --html "$OUT/query.html"
echo "contact sheet: $OUT/query.html"

step "9/9 evaluate on both synth splits: the trained model vs its stage-1 baselines"
$CIRKIT -q evaluate synth -d "$OUT/synth/benchmark" -m "$OUT/stage1" \
    --mode image --mode text --mode sum -o "$OUT/metrics-baselines.json" > /dev/null
$CIRKIT -q evaluate synth -d "$OUT/synth/benchmark" -m "$OUT/model" \
    --mode composed -o "$OUT/metrics-model.json" > /dev/null

python - "$OUT" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path
out, seconds = Path(sys.argv[1]), int(sys.argv[2])
model = json.loads((out / "metrics-model.json").read_text())
base = json.loads((out / "metrics-baselines.json").read_text())
cols = [(s, k) for s in ("test", "compositional") for k in ("R@1", "R@5", "R@10", "R@50")]
rows = [("trained (stage 1+2+combiner)", model, "composed"), ("stage 1: image only", base, "image"),
        ("stage 1: text only", base, "text"), ("stage 1: image+text sum", base, "sum")]
print(f"\n{'synth recall (%)':30s}" + "".join(f"{(s[:4] + '.' if s == 'compositional' else s) + ' ' + k:>11s}" for s, k in cols))
for label, m, mode in rows:
    print(f"{label:30s}" + "".join(f"{m[f'{mode}/{s}/{k}']:11.1f}" for s, k in cols))
print(f"\nquick start finished in {seconds // 60} min {seconds % 60} s; outputs in {out}/")
PY
