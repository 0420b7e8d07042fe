"""How much of the segmentation is lost to where the prompts sit, on the validation tiles.

    python -m cfrsam.train.prompt_location --checkpoint runs/final.pt [--min-foreground 0.3 --nms-radius 12]

The segmentation stage trains on ground-truth centroids; the served model prompts it with the
prompter's points, a few pixels off. This runs, per validation tile, the serving rules
(`inference.segment_tile`) with:

- `pipeline`: the prompter's points (what the services do);
- `oracle_location`: the same points, each one paired with a true nucleus moved onto its centroid
  (unpaired points stay): the pipeline with perfect localisation, same detections;
- `gt`: the ground-truth centroids;
- `gt_prompter_offsets`: the centroids moved by offsets drawn from the prompter's own (paired
  point minus centroid, collected over the tiles seen so far);
- `gt_jitter_S`: the centroids moved by Gaussian noise of std S px per axis;
- `pipeline_recentred` (with `--recentre`): the pipeline's instances prompted again at their own
  centroids (a second decoding round: what re-centring the prompts at serving time would give).

It prints the prompter's offset distribution and bPQ / AJI / detection F1 of each, and writes them
as JSON with `--json`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from ..build import build_cfr_sam
from ..inference import detect_points, segment_tile
from ..metrics import MetricAccumulator, pair_points
from . import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_analysis_args(parser)
    parser.add_argument("--jitters", default="2,4", help="Gaussian jitters (px, std per axis) of the centroids")
    parser.add_argument("--window", type=int, default=0, help="refinement window (px; 0: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recentre", action="store_true", help="also decode again at the instances' centroids")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = {"bgmr__window": args.window} if args.window else {}
    model = build_cfr_sam(None, checkpoint=common.read_init(args.checkpoint), **overrides)
    model.eval()
    val_set = common.validation_set(
        args.data, args.val_sources, args.val_limit, model.config.class_names, model.config.input_size
    )
    jitters = [float(s) for s in args.jitters.split(",") if s]
    size = model.config.input_size
    rng = np.random.default_rng(args.seed)
    names = ["pipeline", "oracle_location", "gt", "gt_prompter_offsets"] + [f"gt_jitter_{s:g}" for s in jitters]
    names += ["pipeline_recentred"] if args.recentre else []
    accs = {name: MetricAccumulator(num_classes=model.config.num_classes, radius=args.radius) for name in names}
    offsets = []
    started = time.time()

    def segment(image, points, classes=None):
        return segment_tile(model, image, points=np.clip(points, 0, size - 1e-3), point_classes=classes)[0]

    for idx in range(len(val_set)):
        item = val_set[idx]
        image = item["image"][None]
        gt = item["instances"].numpy()
        centroids = item["centroids"].numpy().reshape(-1, 2)
        points, classes, _, _ = detect_points(model, image, args.min_foreground, args.nms_radius)
        served = segment(image, points, classes) if len(points) else np.zeros_like(gt)
        accs["pipeline"].add(gt, served)
        if args.recentre:
            ids = [i for i in np.unique(served) if i > 0]
            again = np.array([np.argwhere(served == i).mean(0)[::-1] + 0.5 for i in ids]).reshape(-1, 2)
            accs["pipeline_recentred"].add(gt, segment(image, again) if len(again) else np.zeros_like(gt))
        if len(centroids) == 0:
            continue
        pairs = pair_points(points, centroids, args.radius)
        offsets.extend((points[pairs[:, 0]] - centroids[pairs[:, 1]]).tolist())
        moved = points.copy()
        moved[pairs[:, 0]] = centroids[pairs[:, 1]]
        accs["oracle_location"].add(gt, segment(image, moved, classes) if len(moved) else np.zeros_like(gt))
        accs["gt"].add(gt, segment(image, centroids))
        if offsets:
            drawn = np.asarray(offsets)[rng.integers(0, len(offsets), len(centroids))]
            accs["gt_prompter_offsets"].add(gt, segment(image, centroids + drawn))
        for s in jitters:
            accs[f"gt_jitter_{s:g}"].add(gt, segment(image, centroids + rng.normal(0, s, centroids.shape)))

    offsets = np.asarray(offsets).reshape(-1, 2)
    dist = np.linalg.norm(offsets, axis=1)
    report = {
        "checkpoint": args.checkpoint,
        "tiles": len(val_set),
        "prompter": {"min_foreground": args.min_foreground, "nms_radius": args.nms_radius},
        "offsets": {
            "paired_points": int(len(offsets)),
            "mean_px": float(dist.mean()) if len(dist) else None,
            "median_px": float(np.median(dist)) if len(dist) else None,
            "p90_px": float(np.percentile(dist, 90)) if len(dist) else None,
            "std_per_axis_px": offsets.std(0).tolist() if len(dist) else None,
        },
        "runs": {},
    }
    print(
        f"{len(val_set)} tiles in {time.time() - started:.0f} s; {len(offsets)} prompter points paired with a"
        f" nucleus: offset from its centroid mean {report['offsets']['mean_px']:.2f} px, median"
        f" {report['offsets']['median_px']:.2f}, 90th percentile {report['offsets']['p90_px']:.2f}",
        file=sys.stderr,
    )
    print(f"{'prompts':22s} {'bPQ':>7s} {'AJI':>7s} {'F1d':>7s}")
    for name, acc in accs.items():
        s = acc.summary()
        report["runs"][name] = {k: s[k] for k in ("bpq", "aji", "det_f1")}
        print(f"{name:22s} {s['bpq']:7.4f} {s['aji']:7.4f} {s['det_f1']:7.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
