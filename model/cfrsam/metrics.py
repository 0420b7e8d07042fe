"""Nuclei metrics for validation during training.

Same definitions as the TypeScript evaluation module (packages/common/src/metrics), which follows
HoVer-Net's and PanNuke's evaluation code: PQ matches instances with IoU > 0.5 (unique), AJI pairs
each true instance with its best-IoU prediction, detection F1 pairs centroids one-to-one within a
radius. Kept small: training only needs per-image bPQ, per-class PQ, AJI and pooled detection
counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
from scipy.optimize import linear_sum_assignment


def _relabel(label: np.ndarray) -> np.ndarray:
    ids = np.unique(label)
    ids = ids[ids != 0]
    lut = np.zeros(int(label.max()) + 1 if label.size else 1, dtype=np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[label]


def _pair_table(gt: np.ndarray, pred: np.ndarray):
    """Intersections, areas and IoU of every (gt, pred) pair, in one pass over the pixels."""
    n_gt, n_pred = int(gt.max()), int(pred.max())
    both = (gt > 0) & (pred > 0)
    inter = np.zeros((n_gt + 1, n_pred + 1), dtype=np.int64)
    np.add.at(inter, (gt[both], pred[both]), 1)
    gt_area = np.bincount(gt.ravel(), minlength=n_gt + 1)
    pred_area = np.bincount(pred.ravel(), minlength=n_pred + 1)
    union = gt_area[:, None] + pred_area[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return inter[1:, 1:], gt_area[1:], pred_area[1:], iou[1:, 1:]


def pq(gt: np.ndarray, pred: np.ndarray) -> Dict[str, float]:
    """Panoptic quality (DQ x SQ) with unique matches at IoU > 0.5. Both empty -> NaN-free 1.0s is
    not what the reference code does: it returns 0 (no TP); callers skip images with empty GT for
    per-class PQ as PanNuke does."""
    gt, pred = _relabel(gt), _relabel(pred)
    _, _, _, iou = _pair_table(gt, pred)
    if iou.size:
        tp_mask = iou > 0.5
        tp = int(tp_mask.sum())
        sum_iou = float(iou[tp_mask].sum())
    else:
        tp, sum_iou = 0, 0.0
    fp = int(pred.max()) - tp
    fn = int(gt.max()) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn) if (tp + fp + fn) else 0.0
    sq = sum_iou / (tp + 1e-6)
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn, "sum_iou": sum_iou}


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017) as in HoVer-Net's get_fast_aji."""
    gt, pred = _relabel(gt), _relabel(pred)
    inter, gt_area, pred_area, iou = _pair_table(gt, pred)
    if gt_area.size == 0:
        # Both empty: undefined, left out of the mean over images, as the services' evaluation does
        # (packages/nuclei/src/metrics/aji.ts); counting it as 1.0 raised the 80 tiles' AJI by 0.007.
        return float("nan") if pred_area.size == 0 else 0.0
    if pred_area.size == 0:
        return 0.0
    best = iou.argmax(axis=1)
    has = iou[np.arange(len(gt_area)), best] > 0
    union_pairs = gt_area[:, None] + pred_area[None, :] - inter
    c = float(inter[np.arange(len(gt_area)), best][has].sum())
    u = float(union_pairs[np.arange(len(gt_area)), best][has].sum()) + float(gt_area[~has].sum())
    used = np.zeros(len(pred_area), dtype=bool)
    used[best[has]] = True
    u += float(pred_area[~used].sum())
    return c / u if u else 0.0


def centroids(label: np.ndarray) -> np.ndarray:
    """Centroids (x, y) of instances 1..N in pixel-centre coordinates."""
    label = _relabel(label)
    n = int(label.max())
    if n == 0:
        return np.zeros((0, 2))
    ys, xs = np.nonzero(label)
    ids = label[ys, xs]
    count = np.bincount(ids, minlength=n + 1)[1:]
    cx = np.bincount(ids, weights=xs + 0.5, minlength=n + 1)[1:] / np.maximum(count, 1)
    cy = np.bincount(ids, weights=ys + 0.5, minlength=n + 1)[1:] / np.maximum(count, 1)
    return np.stack([cx, cy], axis=1)


def pair_points(a: np.ndarray, b: np.ndarray, radius: float):
    """One-to-one pairing of two point sets by Hungarian on distances, kept within radius."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    r, c = linear_sum_assignment(d)
    keep = d[r, c] <= radius
    return np.stack([r[keep], c[keep]], axis=1)


@dataclass
class MetricAccumulator:
    """Per-image bPQ / mPQ / AJI averaged over images, detection F1 pooled over the dataset."""

    num_classes: int
    radius: float = 12.0
    bpq: List[float] = field(default_factory=list)
    aji_values: List[float] = field(default_factory=list)
    class_pq: List[List[float]] = field(default_factory=list)
    tp: int = 0
    fp: int = 0
    fn: int = 0
    type_correct: int = 0
    images: int = 0

    def __post_init__(self):
        self.class_pq = [[] for _ in range(self.num_classes)]

    def add(
        self,
        gt: np.ndarray,
        pred: np.ndarray,
        gt_classes: Optional[Dict[int, int]] = None,
        pred_classes: Optional[Dict[int, int]] = None,
    ) -> Dict[str, float]:
        b = pq(gt, pred)["pq"] if gt.max() > 0 else None
        a = aji(gt, pred)
        self.images += 1
        if b is not None:
            self.bpq.append(b)
        if not np.isnan(a):
            self.aji_values.append(a)
        if gt_classes is not None and pred_classes is not None:
            for k in range(self.num_classes):
                g = np.where(np.isin(gt, [i for i, c in gt_classes.items() if c == k]), gt, 0)
                if g.max() == 0:
                    continue  # PanNuke: a class absent from this image's GT is left out
                p = np.where(np.isin(pred, [i for i, c in pred_classes.items() if c == k]), pred, 0)
                self.class_pq[k].append(pq(g, p)["pq"])
        gt_ids = [i for i in np.unique(gt) if i != 0]
        pred_ids = [i for i in np.unique(pred) if i != 0]
        gc, pc = centroids(gt), centroids(pred)
        pairs = pair_points(gc, pc, self.radius)
        self.tp += len(pairs)
        self.fp += len(pc) - len(pairs)
        self.fn += len(gc) - len(pairs)
        if gt_classes is not None and pred_classes is not None:
            for gi, pi in pairs:
                if gt_classes.get(int(gt_ids[gi]), -1) == pred_classes.get(int(pred_ids[pi]), -2):
                    self.type_correct += 1
        return {"bpq": float("nan") if b is None else b, "aji": a}

    def summary(self) -> Dict[str, float]:
        per_class = [float(np.mean(v)) for v in self.class_pq if v]
        f1 = 2 * self.tp / max(2 * self.tp + self.fp + self.fn, 1)
        return {
            "bpq": float(np.mean(self.bpq)) if self.bpq else 0.0,
            "mpq": float(np.mean(per_class)) if per_class else float("nan"),
            "aji": float(np.mean(self.aji_values)) if self.aji_values else 0.0,
            "det_f1": f1,
            "det_precision": self.tp / max(self.tp + self.fp, 1),
            "det_recall": self.tp / max(self.tp + self.fn, 1),
            "type_accuracy": self.type_correct / max(self.tp, 1),
            "images": self.images,
            # PQ of each class (PanNuke averaging over the images whose ground truth has it; None when
            # no image has it): the terms of mpq.
            "pq_per_class": [float(np.mean(v)) if v else None for v in self.class_pq],
        }
