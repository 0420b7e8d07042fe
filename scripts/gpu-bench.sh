#!/usr/bin/env bash
# The GPU path's measurement, prepared for a GPU machine (the `device` tool: one H200, PyTorch +
# CUDA, Python onnxruntime, no Node, no registries). Never needed by tests or CI. About 2 minutes.
#
# On the device (nothing to carry: the committed bundle is in the repository):
#   scripts/gpu-bench.sh            # -> $OUT/stages-gpu.{json,md,log}
# Try it here on the CPU with a tiny budget first:
#   DEVICE=cpu BATCHES=1,2 PRECISIONS=fp32 REPS=2 WARMUP=1 OUT=/tmp/gpu-bench scripts/gpu-bench.sh
#
# Each stage graph (prompter, encoder, decoder_image per tile; decoder_prompts per prompt) at
# batch 1..64 in PyTorch (fp32, bf16 and fp16 autocast; the export wrappers, so the computation
# the ONNX graphs hold), then the bundle's ONNX graphs in Python onnxruntime with the best
# provider it has (CUDA when that build is installed, else its CPU provider on the machine's
# cores), and per runtime the ceiling of a whole tile (tiles/s, Mpx/s at the model's resolution).
# onnxruntime-node's CUDA and WebGPU providers, which the services would use, need Node there: see
# the README (Benchmarks, "GPU path").
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT (the device tool sets it)}"
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/stages-gpu.log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/stages-gpu.log"
cd model
"$PYTHON" -m cfrsam.bench_stages --bundle ../models/tiny --device "${DEVICE:-cuda}" \
  --batches "${BATCHES:-1,2,4,8,16,32,64}" --precisions "${PRECISIONS:-fp32,bf16,fp16}" --onnx \
  --warmup "${WARMUP:-10}" --reps "${REPS:-30}" --out "$OUT/stages-gpu.json" 2>&1 | tee -a "$OUT/stages-gpu.log"
