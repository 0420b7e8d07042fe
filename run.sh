#!/usr/bin/env bash
# The main job from a fresh clone: set up, start the four services on loopback with the committed
# default model (models/tiny), segment an image and write its outputs to out/:
#   NAME.geojson (QuPath), NAME.csv, NAME.labels.png + NAME.json, NAME.overlay.png
# Usage: ./run.sh [IMAGE...]   (default: a held-out CoNSeP tile from ../shared/data when present,
# otherwise samples/synthetic-he-512.png)
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
images=("$@")
if [ ${#images[@]} -eq 0 ]; then
  real="../shared/data/consep-train/train_3_005.png"
  if [ -f "$real" ]; then images=("$real"); else images=("samples/synthetic-he-512.png"); fi
fi
node services/gateway/dist/cli/main.js segment "${images[@]}" --out out
