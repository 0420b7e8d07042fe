"""A bar on each decoded mask's own quality, before the overlaps are resolved (docs/model-history.md).

The decoder answers every prompt with its mask, the predicted IoU and the mean probability over the
mask's pixels (services/decoder/src/pipeline.ts `encodeMask`); the gateway ranks by predicted IoU x
class confidence and drops nothing by quality. Here candidates whose `kind` (iou: predicted IoU;
prob: mean probability; score: the ranking score) is below `bar` are dropped before the served
overlap rule. Each setting is `kind,bar`; the whole pipeline is scored on the 80 held-out CoNSeP
tiles, per source image too.

    cd model && python3 diagnostics/mask_quality.py ../models/tiny prob,0.7 iou,0.58
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cfrsam.inference import resolve_overlaps  # noqa: E402
from shared import SettingScores, first_tiles, model_and_tiles, served_tile, settings_parser  # noqa: E402


def main() -> int:
    args = settings_parser(__doc__).parse_args()
    model, tiles = model_and_tiles(args.checkpoint, args.threads)
    threshold = model.config.mask_threshold
    names = ["served"] + args.settings
    scores = {n: SettingScores(model.config.num_classes) for n in names}
    dropped = dict.fromkeys(names, 0)
    started = time.time()
    items = first_tiles(tiles, args.limit)
    for item in items:
        image = item["image"][None]
        size = image.shape[-1]
        pts, classes, class_scores, _, logits, origins, ious = served_tile(model, image, args.fg, args.nms)
        if len(pts) == 0:
            for name in names:
                scores[name].add(item, np.zeros((size, size), np.int32), {})
            continue
        masks = logits > threshold
        # The decoder service's mean_probability: the mean sigmoid over the mask's pixels, 0 when empty.
        mean_probs = (masks / (1 + np.exp(-logits))).sum((1, 2)) / np.maximum(masks.sum((1, 2)), 1)
        iou = np.nan_to_num(ious, nan=0.0)
        ranking = np.clip(iou, 0, 1) * class_scores
        quality = {"iou": iou, "prob": mean_probs, "score": ranking}
        for name in names:
            keep = np.arange(len(pts))
            if name != "served":
                kind, bar = name.split(",")
                keep = np.flatnonzero(quality[kind] >= float(bar))
            dropped[name] += len(pts) - len(keep)
            labels, accepted = resolve_overlaps(masks[keep], origins[keep], ranking[keep], pts[keep], (size, size))
            scores[name].add(item, labels, {k + 1: int(classes[keep][i]) for k, i in enumerate(accepted)})
    print(f"{len(items)} tiles ({time.time() - started:.0f} s)")
    for name in names:
        scores[name].print(name, f" dropped={dropped[name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
