"""Points fused across anchors, measured offline (docs/model-history.md).

Each point the prompter keeps (foreground >= 0.3, NMS 12 px) is replaced by the foreground-weighted
mean of the points of all candidate anchors within r px of it; prints, for the served points and
each r, the offsets of the points paired with a nucleus (within 12 px) and detection F1, on the 80
held-out CoNSeP tiles:

    cd model && python3 diagnostics/fused_points.py ../models/tiny 4 6 8 12
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cfrsam.inference import point_nms  # noqa: E402
from cfrsam.metrics import pair_points  # noqa: E402
from cfrsam.prompt_learner import decode_prompts  # noqa: E402
from shared import model_and_tiles  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("radii", nargs="*", type=float, default=[4, 6, 8, 12])
    args = parser.parse_args()
    model, tiles = model_and_tiles(args.checkpoint, 1)
    size = model.config.input_size
    variants = [0.0, *args.radii]  # 0: the served points
    offsets = {r: [] for r in variants}
    counts = {r: [0, 0, 0] for r in variants}  # paired, predicted, ground truth
    for idx in range(len(tiles)):
        item = tiles[idx]
        with torch.no_grad():
            out = model.prompt_learner(item["image"][None])
        det = decode_prompts(out["points"], out["logits"], 0.3)[0]
        points = np.clip(det["points"].numpy(), 0, size)
        foreground = det["foreground"].numpy()
        keep = point_nms(points, foreground, 12.0)
        gt = item["centroids"].numpy().reshape(-1, 2)
        for r in variants:
            kept = points[keep].copy()
            if r > 0:
                for j, i in enumerate(keep):
                    weight = foreground * (np.linalg.norm(points - points[i], axis=1) <= r)
                    kept[j] = (points * weight[:, None]).sum(0) / weight.sum()
            pairs = pair_points(gt, kept, 12.0)
            if len(pairs):
                offsets[r].extend(np.linalg.norm(gt[pairs[:, 0]] - kept[pairs[:, 1]], axis=1))
            counts[r][0] += len(pairs)
            counts[r][1] += len(kept)
            counts[r][2] += len(gt)
    for r in variants:
        d = np.asarray(offsets[r])
        tp, predicted, truth = counts[r]
        name = "served" if r == 0 else f"fused r={r:g}"
        print(
            f"{name:14s} offset mean {d.mean():.2f} median {np.median(d):.2f} p90 {np.percentile(d, 90):.2f} px, "
            f"detection F1 {2 * tp / (predicted + truth):.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
