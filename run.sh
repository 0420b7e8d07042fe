#!/usr/bin/env bash
# The main job from a fresh clone: set up, start the four services on loopback with the committed
# default model (models/tiny) and segment into out/.
#   ./run.sh             a whole slide: `cfrsam slide run` on ../shared/slides/CMU-1-Small-Region.svs
#                        (every tissue region, resampled to the model's 0.25 um/px) writing
#                        NAME.geojson.gz (QuPath, level-0 coordinates), NAME.csv, NAME.overview.png and
#                        NAME.summary.json; when the slide is absent, `cfrsam segment` on a held-out
#                        CoNSeP tile from ../shared/data, or on samples/synthetic-he-512.png
#   ./run.sh IMAGE...    `cfrsam segment` on the given images: NAME.geojson (QuPath), NAME.csv,
#                        NAME.labels.png + NAME.json, NAME.overlay.png
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup-serving.sh
if [ $# -gt 0 ]; then
  exec node services/gateway/dist/cli/main.js segment "$@" --out out
fi
slide="../shared/slides/CMU-1-Small-Region.svs"
if [ -f "$slide" ]; then
  exec node services/gateway/dist/cli/main.js slide run "$slide" --out out
fi
image="../shared/data/consep-train/train_3_005.png"
[ -f "$image" ] || image="samples/synthetic-he-512.png"
exec node services/gateway/dist/cli/main.js segment "$image" --out out
