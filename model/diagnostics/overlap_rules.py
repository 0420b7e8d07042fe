"""How the decoded window masks become one label map: the served rule against alternatives.

The gateway (and `inference.resolve_overlaps`) pastes each prompt's thresholded mask in order of
score (predicted IoU x class confidence); a pixel goes to the first mask that claims it. This runs
the whole pipeline once per validation tile at the checkpoint's serving settings, keeps every
prompt's mask logits, and scores several rules on the same prompts:

    cd model && python3 diagnostics/overlap_rules.py ../runs/s8/ship-fg025.pt [--fg 0.25]

Rules: `served`; `argmax` (a contested pixel goes to the mask with the highest logit there, then
each instance gets the served clean-up: holes filled, the component under its point, minimum
area); `served+argmax` (the served rule picks the nuclei and their pixels, a pixel two kept masks
claim goes to the higher logit); `threshold=T` (the served rule at another logit threshold);
`size=A:T` (masks of at least A px at the served threshold thresholded at T).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cfrsam.inference import (  # noqa: E402
    MIN_AREA_PX,
    MIN_KEPT_FRACTION,
    keep_component,
    resolve_overlaps,
)
from shared import SettingScores, model_and_tiles, served_tile  # noqa: E402


def decode_tile(model, image, fg, nms):
    """The served prompts' (points, classes, ranking score, mask logits, origins), None when none."""
    pts, classes, scores, _, logits, origins, ious = served_tile(model, image, fg, nms)
    if len(pts) == 0:
        return None
    quality = np.clip(np.nan_to_num(ious, nan=0.0), 0, 1) * scores
    return pts, classes, quality, logits, origins


def logit_owner(logits, origins, indices, size, threshold):
    """[size, size] map: at each pixel the position in `indices` of the window mask with the highest
    logit above `threshold` there, -1 where none."""
    win = logits.shape[-1]
    best = np.full((size, size), -np.inf, dtype=np.float32)
    owner = np.full((size, size), -1, dtype=np.int64)
    for k, i in enumerate(indices):
        x0, y0 = int(origins[i][0]), int(origins[i][1])
        fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + win, size), min(y0 + win, size)
        if fx1 <= fx0 or fy1 <= fy0:
            continue
        win_logits = logits[i][fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
        region_best = best[fy0:fy1, fx0:fx1]
        take = (win_logits > threshold) & (win_logits > region_best)
        region_best[take] = win_logits[take]
        owner[fy0:fy1, fx0:fx1][take] = k
    return owner


def argmax_rule(logits, origins, quality, pts, size, threshold):
    """A contested pixel goes to the mask with the highest logit; each instance then cleaned up."""
    h = w = size
    owner = logit_owner(logits, origins, range(len(logits)), size, threshold)
    labels = np.zeros((h, w), dtype=np.int32)
    accepted = []
    for i in np.argsort(-quality, kind="stable"):
        ys, xs = np.nonzero(owner == i)
        if len(xs) < MIN_AREA_PX:
            continue
        bx0, by0 = xs.min(), ys.min()
        box = owner[by0 : ys.max() + 1, bx0 : xs.max() + 1] == i
        box = ndimage.binary_fill_holes(box)
        box = keep_component(box, (float(pts[i][0]) - bx0, float(pts[i][1]) - by0))
        region = labels[by0 : by0 + box.shape[0], bx0 : bx0 + box.shape[1]]
        free = box & (region == 0)
        if free.sum() < max(MIN_AREA_PX, MIN_KEPT_FRACTION * box.sum()):
            continue
        accepted.append(int(i))
        region[free] = len(accepted)
    return labels, np.array(accepted, dtype=np.int64)


def served_then_argmax(logits, origins, quality, pts, size, threshold):
    """The served rule decides which prompts become nuclei and which pixels are nucleus; within
    that foreground a pixel claimed by several kept masks goes to the one with the highest logit."""
    labels, accepted = resolve_overlaps(logits > threshold, origins, quality, pts, (size, size))
    owner = logit_owner(logits, origins, accepted, size, threshold) + 1  # 0: unclaimed, k + 1: accepted[k]
    owner[labels == 0] = 0
    # Pixels of the served foreground no kept mask claims above threshold keep their served label.
    unclaimed = (labels > 0) & (owner == 0)
    owner[unclaimed] = labels[unclaimed]
    out = np.zeros_like(labels)
    for k, i in enumerate(accepted):
        mask = owner == k + 1
        if not mask.any():
            continue
        mask = keep_component(mask, (float(pts[i][0]), float(pts[i][1])))
        out[mask] = k + 1
    return out, accepted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--fg", type=float, default=0.25)
    parser.add_argument("--nms", type=float, default=12.0)
    parser.add_argument("--rules", default="served,served+argmax,argmax")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, tiles = model_and_tiles(args.checkpoint, args.threads)
    served_threshold = model.config.mask_threshold
    rules = args.rules.split(",")
    scores = {r: SettingScores(model.config.num_classes) for r in rules}
    started = time.time()
    for idx in range(len(tiles)):
        item = tiles[idx]
        image = item["image"][None]
        size = image.shape[-1]
        decoded = decode_tile(model, image, args.fg, args.nms)
        for rule in rules:
            if decoded is None:
                pred, accepted, classes = np.zeros((size, size), np.int32), np.zeros(0, np.int64), []
            else:
                pts, classes, quality, logits, origins = decoded
                if rule == "served" or rule.startswith("threshold="):
                    t = served_threshold if rule == "served" else float(rule.split("=")[1])
                    pred, accepted = resolve_overlaps(logits > t, origins, quality, pts, (size, size))
                elif rule.startswith("size="):
                    # size=A:T: a mask of at least A px at the served threshold is thresholded at T.
                    area, t = (float(x) for x in rule.split("=")[1].split(":"))
                    served = logits > served_threshold
                    large = served.reshape(len(served), -1).sum(1) >= area
                    masks = np.where(large[:, None, None], logits > t, served)
                    pred, accepted = resolve_overlaps(masks, origins, quality, pts, (size, size))
                elif rule == "served+argmax":
                    pred, accepted = served_then_argmax(logits, origins, quality, pts, size, served_threshold)
                elif rule == "argmax":
                    pred, accepted = argmax_rule(logits, origins, quality, pts, size, served_threshold)
                else:
                    raise SystemExit(f"unknown rule {rule}")
            scores[rule].add(item, pred, {k + 1: int(classes[i]) for k, i in enumerate(accepted)})
    for rule in rules:
        scores[rule].print(rule)
    print(f"({time.time() - started:.0f} s, mask threshold served {served_threshold})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
