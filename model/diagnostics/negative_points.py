"""Neighbouring detections as negative points, without training them (docs/model-history.md).

Runs stage 2's validation (the whole pipeline at the served 0.3 / 12 px, and ground-truth prompts)
with each prompt given up to K other prompts of its tile within R px as negative points
(`inference.negative_prompts`), for each K/R given:

    cd model && python3 diagnostics/negative_points.py ../runs/final-s1mix-m05.pt 0/24 2/24

The checkpoint is the default's float32 weights (the README's finalize command writes it); a
bundle (`../models/tiny`, float16 weights) gives slightly lower figures.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import model_and_tiles  # noqa: E402
from cfrsam.train.stage2 import validate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("settings", nargs="+", help="K/R: negatives per prompt and their radius in px")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, tiles = model_and_tiles(args.checkpoint, args.threads)
    for setting in args.settings:
        count, radius = setting.split("/")
        started = time.time()
        v = validate(
            model,
            tiles,
            torch.device("cpu"),
            0,
            12.0,
            min_foreground=0.3,
            nms_radius=12.0,
            negatives=int(count),
            negative_radius=float(radius),
        )
        figures = " ".join(f"{k}={v[k]:.4f}" for k in ("bpq", "aji", "det_f1", "bpq_gt_prompts", "aji_gt_prompts"))
        print(f"{setting} {figures} ({time.time() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
