"""Where the pipeline loses nuclei: recall (one-to-one pairing within 12 px, as detection F1) after
each step of the served pipeline, on the 80 held-out CoNSeP tiles.

    cd model && python3 diagnostics/recall_breakdown.py ../runs/ship.pt [--fg 0.25]

Steps: the learner's candidate points (foreground >= a low threshold, then the served one, before
NMS), after the prompter's NMS, after the refiner moved them, after its score bar and second NMS,
and the final instances' centroids. Also: how many candidates of each true nucleus pass.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cfrsam.inference import point_nms, segment_tile  # noqa: E402
from cfrsam.metrics import centroids, pair_points  # noqa: E402
from cfrsam.prompt_learner.prompt_learner import decode_prompts  # noqa: E402
from shared import model_and_tiles  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--fg", type=float, default=0.25)
    parser.add_argument("--nms", type=float, default=12.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, tiles = model_and_tiles(args.checkpoint, args.threads)
    refiner = model.point_refiner
    steps = ["fg>=0.1", "fg>=0.15", f"fg>={args.fg}", "nms", "refined", "bar+nms", "final"]
    paired = dict.fromkeys(steps, 0)
    counts = dict.fromkeys(steps, 0)
    total = 0
    lost_by_class = {}
    by_class = {}  # (step, class) -> paired
    class_total = {}
    for idx in range(len(tiles)):
        item = tiles[idx]
        image = item["image"][None]
        size = image.shape[-1]
        gt = item["instances"].numpy()
        gc = centroids(gt)
        gcls = item["classes"].numpy()
        total += len(gc)
        for c in gcls.tolist():
            class_total[int(c)] = class_total.get(int(c), 0) + 1
        with torch.no_grad():
            out = model.detect(image)
            sets = {}
            for t in (0.1, 0.15, args.fg):
                det = decode_prompts(out["points"], out["logits"], t)[0]
                sets[t] = (np.clip(det["points"].float().numpy(), 0, size), det["foreground"].float().numpy())
            pts, fg = sets[args.fg]
            keep = point_nms(pts, fg, args.nms)
            kept = pts[keep]
            refined, on_nucleus, _ = model.refine_and_score_points(image, torch.from_numpy(kept).float())
            refined = refined.float().numpy()
            verified = np.flatnonzero(on_nucleus.float().numpy() >= refiner.cfg.min_score)
            again = verified[point_nms(refined[verified], fg[keep][verified], refiner.cfg.nms_radius)]
            pred, _ = segment_tile(model, image, args.fg, args.nms)
        stage_points = {
            "fg>=0.1": sets[0.1][0],
            "fg>=0.15": sets[0.15][0],
            f"fg>={args.fg}": pts,
            "nms": kept,
            "refined": refined,
            "bar+nms": refined[again],
            "final": centroids(pred),
        }
        for step, p in stage_points.items():
            pairs = pair_points(gc, p.reshape(-1, 2), 12.0)
            paired[step] += len(pairs)
            counts[step] += len(p)
            for gi in pairs[:, 0].tolist():
                key = (step, int(gcls[gi]))
                by_class[key] = by_class.get(key, 0) + 1
            if step == "final" and len(gc):
                found = set(pairs[:, 0].tolist())
                for i in range(len(gc)):
                    if i not in found:
                        c = int(gcls[i])
                        lost_by_class[c] = lost_by_class.get(c, 0) + 1
    print(f"{total} annotated nuclei")
    for step in steps:
        print(f"{step:10s} points {counts[step]:6d}  paired {paired[step]:5d}  recall {paired[step] / total:.3f}")
    names = model.config.class_names
    for c in sorted(class_total):
        row = " ".join(f"{by_class.get((step, c), 0) / class_total[c]:.3f}" for step in steps)
        print(f"{names[c]:15s} n={class_total[c]:5d} recall per step: {row}")
    print("missed at the end, by class:", {names[k]: v for k, v in sorted(lost_by_class.items())})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
