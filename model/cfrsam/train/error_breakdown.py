"""Where a model's errors are on the validation tiles (PyTorch, the serving rules).

    python -m cfrsam.train.error_breakdown --checkpoint ../models/tiny [--json out.json]

- instances: predicted nuclei matched (IoU > 0.5, as bPQ matches), unmatched ones on no annotated
  nucleus (under 30 % of their area on any one), duplicating a matched nucleus, or overlapping an
  unmatched one too little; ground-truth nuclei missed (best IoU < 0.1) or poorly segmented;
- points: the prompter's served points on a nucleus (on one or within 6 px of a centroid) or not;
- classes: mPQ as served and with each predicted instance given the class of the annotated nucleus
  it mostly covers (oracle classes for the same instances): the headroom of classification.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import torch

from ..build import build_cfr_sam
from ..inference import detect_points, segment_tile
from ..metrics import MetricAccumulator
from . import common
from .refiner import lies_on_nucleus


def instance_errors(gt: np.ndarray, pred: np.ndarray) -> Counter:
    counts: Counter = Counter()
    gt_ids, pred_ids = [g for g in np.unique(gt) if g], [p for p in np.unique(pred) if p]
    both = (gt > 0) & (pred > 0)
    pairs = Counter(zip(gt[both].tolist(), pred[both].tolist()))
    gt_area = {g: int((gt == g).sum()) for g in gt_ids}
    pred_area = {p: int((pred == p).sum()) for p in pred_ids}
    best_gt = dict.fromkeys(gt_ids, 0.0)
    matched_gt, matched_pred = set(), set()
    for (g, p), n in pairs.items():
        iou = n / (gt_area[g] + pred_area[p] - n)
        best_gt[g] = max(best_gt[g], iou)
        if iou > 0.5:
            matched_gt.add(g)
            matched_pred.add(p)
    for p in pred_ids:
        if p in matched_pred:
            counts["pred_matched"] += 1
            continue
        covered = {g: n / pred_area[p] for (g, q), n in pairs.items() if q == p}
        if max(covered.values(), default=0.0) < 0.3:
            counts["pred_on_no_nucleus"] += 1
        elif any(g in matched_gt for g, f in covered.items() if f >= 0.3):
            counts["pred_duplicate"] += 1
        else:
            counts["pred_overlap_too_small"] += 1
    for g in gt_ids:
        if g not in matched_gt:
            counts["gt_missed" if best_gt[g] < 0.1 else "gt_poorly_segmented"] += 1
    counts["gt"] += len(gt_ids)
    counts["pred"] += len(pred_ids)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_analysis_args(parser)
    parser.add_argument("--on-radius", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_cfr_sam(None, checkpoint=common.read_init(args.checkpoint))
    model.eval()
    val_set = common.validation_set(
        args.data, args.val_sources, args.val_limit, model.config.class_names, model.config.input_size
    )
    K = model.config.num_classes
    served, oracle = MetricAccumulator(num_classes=K, radius=args.radius), MetricAccumulator(
        num_classes=K, radius=args.radius
    )
    counts: Counter = Counter()
    for i in range(len(val_set)):
        item = val_set[i]
        image, gt = item["image"][None], item["instances"].numpy()
        gt_classes = {j + 1: int(c) for j, c in enumerate(item["classes"].tolist())}
        points = detect_points(model, image, args.min_foreground, args.nms_radius)[0]
        centroids = item["centroids"].numpy().reshape(-1, 2)
        counts["points"] += len(points)
        counts["points_on_nucleus"] += int(lies_on_nucleus(points, gt, centroids, args.on_radius).sum())
        labels, classes = segment_tile(model, image, args.min_foreground, args.nms_radius)
        counts += instance_errors(gt, labels)
        served.add(gt, labels, gt_classes, classes)
        oracle_classes = dict(classes)
        for p in classes:
            ids, n = np.unique(gt[labels == p], return_counts=True)
            n[ids == 0] = 0  # the annotated nucleus the instance mostly covers, not the background
            if n.max() > 0 and gt_classes.get(int(ids[n.argmax()]), -1) >= 0:
                oracle_classes[p] = gt_classes[int(ids[n.argmax()])]
        oracle.add(gt, labels, gt_classes, oracle_classes)
    report = {
        "checkpoint": args.checkpoint,
        "tiles": len(val_set),
        **dict(counts),
        "mpq": served.summary()["mpq"],
        "mpq_oracle_classes": oracle.summary()["mpq"],
        "type_accuracy": served.summary()["type_accuracy"],
    }
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
