"""Which anchors the prompter's points come from, and how far off each kind sits.

    python -m cfrsam.train.kept_anchors --checkpoint models/tiny [--min-foreground 0.3 --nms-radius 12]

Stage 1 matches one anchor to each nucleus (Hungarian, the training loss's matcher) and trains
only that anchor's point regression; its neighbours learn "background". The prompter service keeps,
after its foreground threshold and point NMS, the anchor of highest foreground near each nucleus,
which need not be the matched one. This splits the kept points of the validation tiles by whether
the matcher (run on the same outputs, as in training) picked their anchor, and prints for each kind
how many paired with a nucleus (within --radius) and how far from its centroid they sit, then the
same offsets by the true class of the nucleus. It is the measurement behind stage 1's
`--dense-regression`.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from ..build import build_cfr_sam
from ..inference import point_nms
from ..metrics import pair_points
from ..prompt_learner import decode_prompts
from ..prompt_learner.matcher import match_anchors
from . import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_analysis_args(parser)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    model = build_cfr_sam(None, checkpoint=common.read_init(args.checkpoint)).eval()
    val_set = common.validation_set(
        args.data, args.val_sources, args.val_limit, model.config.class_names, model.config.input_size
    )
    kinds = {True: {"kept": 0, "offsets": []}, False: {"kept": 0, "offsets": []}}
    by_class = {name: {"kept": 0, "offsets": []} for name in model.config.class_names}
    for idx in range(len(val_set)):
        item = val_set[idx]
        with torch.no_grad():
            out = model.prompt_learner(item["image"][None])
        gt, gt_classes = item["centroids"].numpy().reshape(-1, 2), item["classes"].numpy()
        probs = out["logits"][0].float().softmax(-1).numpy()
        matched = set(match_anchors(probs, out["points"][0].float().numpy(), gt, gt_classes)[0].tolist())
        det = decode_prompts(out["points"], out["logits"], args.min_foreground)[0]
        points = np.clip(det["points"].float().numpy(), 0, model.config.input_size)
        keep = point_nms(points, det["foreground"].float().numpy(), args.nms_radius)
        points, anchors = points[keep], det["anchor_index"].numpy()[keep]
        pairs = pair_points(gt, points, args.radius)
        offset = {p: float(np.linalg.norm(gt[g] - points[p])) for g, p in pairs}
        for g, p in pairs:
            if 0 <= gt_classes[g] < len(model.config.class_names):
                by_class[model.config.class_names[gt_classes[g]]]["offsets"].append(offset[p])
        for k, anchor in enumerate(anchors):
            kind = kinds[int(anchor) in matched]
            kind["kept"] += 1
            if k in offset:
                kind["offsets"].append(offset[k])

    def offsets_of(kind):
        d = np.asarray(kind["offsets"])
        return {
            "paired": int(len(d)),
            "mean_px": float(d.mean()) if len(d) else None,
            "median_px": float(np.median(d)) if len(d) else None,
            "p90_px": float(np.percentile(d, 90)) if len(d) else None,
        }

    report = {
        "checkpoint": args.checkpoint,
        "tiles": len(val_set),
        "from_matched_anchors": {"kept": kinds[True]["kept"], **offsets_of(kinds[True])},
        "from_other_anchors": {"kept": kinds[False]["kept"], **offsets_of(kinds[False])},
        "by_class": {name: offsets_of(kind) for name, kind in by_class.items()},
    }
    rows = [
        ("from matched anchors", report["from_matched_anchors"]),
        ("from other anchors", report["from_other_anchors"]),
    ]
    rows += [(f"paired with {name}", row) for name, row in report["by_class"].items()]
    print(f"{'kept points':28s} {'kept':>6s} {'paired':>7s} {'mean px':>8s} {'median':>7s} {'p90':>6s}")
    for name, row in rows:
        kept = f"{row['kept']:6d}" if "kept" in row else " " * 6
        stats = f"{row['mean_px']:8.2f} {row['median_px']:7.2f} {row['p90_px']:6.2f}" if row["paired"] else ""
        print(f"{name:28s} {kept} {row['paired']:7d} {stats}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
