"""A second prompting pass over what the first left uncovered (docs/model-history.md).

The served pipeline loses a tenth of the nuclei at the prompter's point NMS and another tenth at the
refiner's score bar (`recall_breakdown.py`). Here the first pass is served as it is; then the
learner's candidates (foreground >= `fg`, all of them refined and scored) whose refined point lies on
no first-pass instance, at least `dmin` px from every first-pass prompt and with the refiner's
on-nucleus probability >= `bar`, are merged by point NMS at `nms` px (ranked by foreground x
on-nucleus) and decoded; those whose predicted IoU is at least `min_iou` (optional, default 0) join the overlap resolution after every first-pass mask, so
they only take pixels the first pass left free. Each setting is `fg,bar,dmin,nms[,min_iou]`; the whole
pipeline is scored (bPQ, AJI, mPQ, detection) with the served pipeline as the first row, per source
image too, and the extra prompts counted (the decoder's cost grows with them).

    cd model && python3 diagnostics/second_pass.py ../runs/ship.pt "0.25,0.4,8,12" "0.15,0.5,8,12"
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cfrsam.inference import mix_class_probabilities, point_nms, resolve_overlaps  # noqa: E402
from cfrsam.prompt_learner.prompt_learner import decode_prompts  # noqa: E402
from shared import (
    SettingScores,
    decode_points,
    first_tiles,
    model_and_tiles,
    served_tile,
    settings_parser,
)  # noqa: E402


@torch.no_grad()
def candidates(model, image, fg):
    """Every candidate at foreground >= fg, refined: (points, on-nucleus, classes, class score, fg)."""
    size = image.shape[-1]
    out = model.detect(image)
    det = decode_prompts(out["points"], out["logits"], fg)[0]
    pts = np.clip(det["points"].float().numpy(), 0, size)
    foreground = det["foreground"].float().numpy()
    if len(pts) == 0:
        return pts, np.zeros(0), np.zeros(0, np.int64), np.zeros(0), foreground
    probs = out["logits"][0].float().softmax(-1)[det["anchor_index"]][:, :-1]
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    refined, on_nucleus, refiner_probs = model.refine_and_score_points(image, torch.from_numpy(pts).float())
    probs = mix_class_probabilities(probs, refiner_probs.float(), model.point_refiner.cfg.class_weight)
    classes = probs.argmax(-1).numpy()
    scores = foreground * probs.max(-1).values.numpy()
    return np.clip(refined.float().numpy(), 0, size - 1e-3), on_nucleus.float().numpy(), classes, scores, foreground


def main() -> int:
    args = settings_parser(__doc__).parse_args()
    model, tiles = model_and_tiles(args.checkpoint, args.threads)
    threshold = model.config.mask_threshold
    settings = [tuple(float(v) for v in s.split(",")) for s in args.settings]
    names = ["served"] + args.settings
    K = model.config.num_classes
    scores = {n: SettingScores(K) for n in names}
    extra = dict.fromkeys(names, 0)
    first_prompts = 0
    started = time.time()
    items = first_tiles(tiles, args.limit)
    for item in items:
        image = item["image"][None]
        size = image.shape[-1]
        pts1, cls1, sc1, prepared, logits1, o1, iou1 = served_tile(model, image, args.fg, args.nms)
        first_prompts += len(pts1)
        if len(pts1):
            m1 = logits1 > threshold
            q1 = np.clip(np.nan_to_num(iou1, nan=0.0), 0, 1) * sc1
            labels1, acc1 = resolve_overlaps(m1, o1, q1, pts1, (size, size))
        else:
            labels1, acc1 = np.zeros((size, size), np.int32), np.zeros(0, np.int64)
        results = {"served": (labels1, {k + 1: int(cls1[i]) for k, i in enumerate(acc1)})}
        pool = {}
        for setting, name in zip(settings, args.settings):
            fg, bar, dmin, nms, min_iou = setting if len(setting) == 5 else (*setting, 0.0)
            if fg not in pool:
                pool[fg] = candidates(model, image, fg)
            pts, on, cls, sc, fgs = pool[fg]
            ok = on >= bar
            if len(pts):
                ix, iy = pts[:, 0].astype(int), pts[:, 1].astype(int)
                ok &= labels1[iy, ix] == 0
                if len(pts1):
                    d2 = ((pts[:, None, :] - pts1[None, :, :]) ** 2).sum(-1).min(1)
                    ok &= d2 >= dmin**2
            chosen = np.flatnonzero(ok)
            chosen = chosen[point_nms(pts[chosen], (fgs * on)[chosen], nms)] if len(chosen) else chosen
            extra[name] += len(chosen)
            if len(chosen) == 0:
                results[name] = results["served"]
                continue
            logits2, o2, iou2 = decode_points(model, prepared, pts[chosen])
            m2 = logits2 > threshold
            confident = np.flatnonzero(np.nan_to_num(iou2, nan=0.0) >= min_iou)
            chosen, m2, o2, iou2 = chosen[confident], m2[confident], o2[confident], iou2[confident]
            q2 = np.clip(np.nan_to_num(iou2, nan=0.0), 0, 1) * sc[chosen]
            if len(pts1):
                masks = np.concatenate([m1, m2])
                origins = np.concatenate([o1, o2])
                # The first pass keeps its order and its pixels: its masks all rank above the second's.
                quality = np.concatenate([q1 + 2.0, q2])
                prompts = np.concatenate([pts1, pts[chosen]])
                classes = np.concatenate([cls1, cls[chosen]])
            else:
                masks, origins, quality, prompts, classes = m2, o2, q2, pts[chosen], cls[chosen]
            labels, accepted = resolve_overlaps(masks, origins, quality, prompts, (size, size))
            results[name] = (labels, {k + 1: int(classes[i]) for k, i in enumerate(accepted)})
        for name, (pred, pred_classes) in results.items():
            scores[name].add(item, pred, pred_classes)
    print(f"{len(items)} tiles, {first_prompts} first-pass prompts ({time.time() - started:.0f} s)")
    for name in names:
        scores[name].print(name, f" extra_prompts={extra[name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
