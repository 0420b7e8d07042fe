#!/usr/bin/env bash
# One prepared training run for a GPU machine (the `device` tool: one H200, PyTorch + CUDA, no
# registries, at most 10 minutes a command). Never needed by tests or CI.
#
# Here, first (git-ignored, carried with the run):
#   (cd model && /usr/bin/python3 -m cfrsam.data.pack --out ../.gpu/data.tar)   # 34 MiB
# Then on the device, carrying .gpu:
#   scripts/gpu-train.sh            # both stages side by side on the GPU, then finalize -> $OUT
# Try it here on the CPU with a tiny budget first:
#   DEVICE=cpu MINUTES=0.2 S1_EPOCHS=1 S2_EPOCHS=1 STEPS=3 VAL_LIMIT=4 WORKERS=0 OUT=/tmp/gpu-out scripts/gpu-train.sh
#
# Writes $OUT/stage1/{best.pt,log.jsonl}, $OUT/stage2/{best.pt,log.jsonl}, $OUT/final.pt and the
# logs; bring final.pt back and export it here (`python -m cfrsam.export --checkpoint final.pt`).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT (the device tool sets it)}"
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-7}                 # per stage, both run at once
PROMPT_LEARNER=${PROMPT_LEARNER:-nano}
S1_EPOCHS=${S1_EPOCHS:-80}
S2_EPOCHS=${S2_EPOCHS:-16}
STEPS=${STEPS:-0}                     # cap steps per epoch (0: whole set)
INIT=${INIT:-models/tiny}
WORKERS=${WORKERS:-6}
VAL_LIMIT=${VAL_LIMIT:-0}               # validate on at most N tiles (0: all 80)

data=$(mktemp -d)
tar -xf .gpu/data.tar -C "$data"
mkdir -p "$OUT/stage1" "$OUT/stage2"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
cd model
common=(--data "$data" --device "$DEVICE" --bf16 --workers "$WORKERS" --time-budget "$MINUTES" --steps-per-epoch "$STEPS"
  --val-limit "$VAL_LIMIT" --init "../$INIT")
"$PYTHON" -m cfrsam.train.stage1 "${common[@]}" --out "$OUT/stage1" --prompt-learner "$PROMPT_LEARNER" \
  --epochs "$S1_EPOCHS" --batch-size 16 --lr 2e-3 --class-weights balanced --min-foreground 0.3 --nms-radius 10 \
  >"$OUT/stage1.out" 2>&1 &
s1=$!
"$PYTHON" -m cfrsam.train.stage2 "${common[@]}" --out "$OUT/stage2" --epochs "$S2_EPOCHS" --batch-size 8 \
  --max-prompts 32 --lr 1e-3 >"$OUT/stage2.out" 2>&1 &
s2=$!
status=0
wait $s1 || status=$?
wait $s2 || status=$?
tail -n 3 "$OUT/stage1.out" "$OUT/stage2.out"
[ $status -eq 0 ] || exit $status
"$PYTHON" -m cfrsam.train.finalize --data "$data" --stage1 "$OUT/stage1/best.pt" --stage2 "$OUT/stage2/best.pt" \
  --out "$OUT/final.pt" --val-limit "$VAL_LIMIT" >"$OUT/finalize.out" 2>&1
tail -n 2 "$OUT/finalize.out"
rm -f "$OUT/stage1/last.pt" "$OUT/stage2/last.pt"
