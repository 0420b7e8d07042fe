#!/usr/bin/env bash
# The README's Evaluation table for one bundle: every held-out set (and the training sets it names)
# through the services, with `cfrsam stack --standalone` (the same answers as the four services)
# and `cfrsam evaluate`. Needs ../shared/data and a built checkout (./scripts/setup.sh).
#
#   scripts/eval-sets.sh [BUNDLE] [OUT]     (defaults: models/tiny, /tmp/cfrsam-eval)
#   SETS="consep monuseg-held-out" scripts/eval-sets.sh     (a subset)
#
# Sets: consep (the 80 tiles of CoNSeP source images 3, 9, 15, 21, 27), monuseg-held-out (the last
# 3 MoNuSeg images by name, which training holds out with --hold-out monuseg-train=3), nucls-test,
# cpm15 (as it comes: no mpp, so every image is taken at the model's 0.25 um/px), cpm15-mpp (the
# same 15 images with the scale model/cfrsam/data/estimated_mpp.json gives them: its 7 images at 20x
# are sent as 0.5 um/px, as a user who knows the scan's magnification would), monuseg-train (all 13).
# Two sets of training images, for choosing a serving setting on images that are not evaluated
# (e.g. on blurred copies: model/diagnostics/blur_sets.py --training): consep-training (the 80 tiles
# of CoNSeP training sources 2, 8, 14, 20, 26) and monuseg-trained (the 10 MoNuSeg images trained on).
# Prints each set's summary; scores.json and CSVs land in OUT/SET.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-models/tiny}
OUT=${2:-/tmp/cfrsam-eval}
DATA=${CFRSAM_DATA:-../shared/data}
SETS=${SETS:-consep monuseg-held-out nucls-test cpm15 cpm15-mpp monuseg-train}
PORT=${PORT:-50261}
[ -d "$DATA/consep-train" ] || { echo "eval-sets: no data at $DATA (set CFRSAM_DATA)" >&2; exit 2; }

link_set() { # link_set NAME SRC_DIR SAMPLE_NAMES...
  local dir="$OUT/data/$1" src=$2
  shift 2
  rm -rf "$dir" && mkdir -p "$dir"
  for n in "$@"; do
    for f in "$src/$n".png "$src/$n".labels.png "$src/$n".json; do ln -s "$(realpath "$f")" "$dir/"; done
  done
}
# with_estimated_mpp NAME: the set's JSONs replaced by copies that carry the committed mpp estimate.
with_estimated_mpp() {
  node -e '
    const fs = require("fs"), path = require("path");
    const [dir, table] = process.argv.slice(1);
    const samples = JSON.parse(fs.readFileSync(table, "utf8")).samples;
    for (const f of fs.readdirSync(dir).filter((f) => f.endsWith(".json"))) {
      const file = path.join(dir, f), meta = JSON.parse(fs.readFileSync(file, "utf8"));
      const estimate = samples["cpm15/" + f.slice(0, -5)];
      if (estimate && !meta.mpp) meta.mpp = estimate.mpp;
      fs.rmSync(file);
      fs.writeFileSync(file, JSON.stringify(meta));
    }' "$OUT/data/$1" model/cfrsam/data/estimated_mpp.json
}
names() { ls "$1" | sed -n 's/\.labels\.png$//p' | sort; }

mkdir -p "$OUT"
link_set consep "$DATA/consep-train" $(names "$DATA/consep-train" | grep -E '^train_(3|9|15|21|27)_')
link_set monuseg-held-out "$DATA/monuseg-train" $(names "$DATA/monuseg-train" | tail -3)
link_set nucls-test "$DATA/nucls/test" $(names "$DATA/nucls/test")
link_set cpm15 "$DATA/cpm15" $(names "$DATA/cpm15")
link_set cpm15-mpp "$DATA/cpm15" $(names "$DATA/cpm15") && with_estimated_mpp cpm15-mpp
link_set monuseg-train "$DATA/monuseg-train" $(names "$DATA/monuseg-train")
link_set consep-training "$DATA/consep-train" $(names "$DATA/consep-train" | grep -E '^train_(2|8|14|20|26)_')
link_set monuseg-trained "$DATA/monuseg-train" $(names "$DATA/monuseg-train" | head -n -3)

node services/gateway/dist/cli/main.js stack --standalone --bundle "$BUNDLE" --port "$PORT" --quiet &
STACK=$!
trap 'kill $STACK 2>/dev/null; wait $STACK 2>/dev/null || true' EXIT
for set in $SETS; do
  echo "== $set ($BUNDLE)"
  node services/gateway/dist/cli/main.js evaluate --data "$OUT/data/$set" --gateway "127.0.0.1:$PORT" \
    --connect-timeout-s 120 --summary-only --out "$OUT/$set"
done
