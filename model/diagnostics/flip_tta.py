"""The prompt learner run on flipped copies of each tile, its candidates fused (docs/model-history.md).

Test-time augmentation for detection: the learner sees the tile as it is and flipped (`h`: left-right;
`hv`: also top-bottom and both, four views), each view's candidates at foreground >= 0.05 are mapped
back to the tile, and candidates of different views closer than `radius` px are fused greedily
(most confident first, at most one per view): the point is the foreground-weighted mean, the K+1
probabilities the mean over the views, a view that found nothing there counting as background. The
fused candidates then go through the served rules unchanged (threshold, NMS, point refiner, score
bar, decoding, overlaps), and the whole pipeline is scored on the 80 held-out CoNSeP tiles, per
source image too. Each setting is `views,radius`; the learner's cost grows with the views. `id`
(the tile alone) reproduces the served pipeline: a check of the fusion.

    cd model && python3 diagnostics/flip_tta.py ../models/tiny h,4 h,6 hv,6
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cfrsam.inference as inference  # noqa: E402
from shared import SettingScores, first_tiles, model_and_tiles, settings_parser  # noqa: E402

VIEWS = {
    "id": [(False, False)],
    "h": [(False, False), (True, False)],
    "hv": [(False, False), (True, False), (False, True), (True, True)],
}
FLOOR = 0.05


def fuse(views, radius, classes):
    """views: [(points [A, 2], probs [A, K+1])] in tile coordinates -> fused (points [P, 2], probs [P, K+1])."""
    pts, probs, view = [], [], []
    for v, (p, q) in enumerate(views):
        keep = (1.0 - q[:, -1]) >= FLOOR
        pts.append(p[keep])
        probs.append(q[keep])
        view.append(np.full(int(keep.sum()), v))
    pts, probs, view = np.concatenate(pts), np.concatenate(probs), np.concatenate(view)
    n = len(views)
    order = np.argsort(-(1.0 - probs[:, -1]), kind="stable")
    taken = np.zeros(len(pts), bool)
    background = np.zeros(classes + 1)
    background[-1] = 1.0
    out_pts, out_probs = [], []
    for i in order:
        if taken[i]:
            continue
        taken[i] = True
        members = [i]
        d2 = ((pts - pts[i]) ** 2).sum(-1)
        for v in range(n):
            if v == view[i]:
                continue
            cand = np.flatnonzero((view == v) & ~taken & (d2 <= radius**2))
            if len(cand):
                j = cand[np.argmin(d2[cand])]
                taken[j] = True
                members.append(j)
        fg = 1.0 - probs[members, -1]
        out_pts.append((pts[members] * fg[:, None]).sum(0) / max(fg.sum(), 1e-9))
        out_probs.append((probs[members].sum(0) + (n - len(members)) * background) / n)
    return np.array(out_pts, np.float32).reshape(-1, 2), np.array(out_probs, np.float32).reshape(-1, classes + 1)


def tta_detect(detect, views, radius, classes):
    @torch.no_grad()
    def run(image):
        size = image.shape[-1]
        outputs = []
        for flip_x, flip_y in views:
            dims = [d for d, f in ((-1, flip_x), (-2, flip_y)) if f]
            out = detect(image.flip(dims) if dims else image)
            p = out["points"][0].float().numpy().copy()
            if flip_x:
                p[:, 0] = size - p[:, 0]
            if flip_y:
                p[:, 1] = size - p[:, 1]
            outputs.append((p, out["logits"][0].float().softmax(-1).numpy()))
        pts, probs = fuse(outputs, radius, classes)
        return {
            "points": torch.from_numpy(pts)[None],
            "logits": torch.from_numpy(np.log(np.clip(probs, 1e-12, 1)))[None],
        }

    return run


def main() -> int:
    args = settings_parser(__doc__).parse_args()
    model, tiles = model_and_tiles(args.checkpoint, args.threads)
    served_detect = model.detect
    K = model.config.num_classes
    items = first_tiles(tiles, args.limit)
    for setting in ["served"] + args.settings:
        if setting == "served":
            model.detect = served_detect
        else:
            views, radius = setting.split(",")
            model.detect = tta_detect(served_detect, VIEWS[views], float(radius), K)
        scores = SettingScores(K)
        started = time.time()
        for item in items:
            scores.add(item, *inference.segment_tile(model, item["image"][None], args.fg, args.nms))
        scores.print(setting, f" ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
