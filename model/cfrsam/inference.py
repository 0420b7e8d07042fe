"""Whole-tile inference in PyTorch: the reference of what the services compute, used for validation.

Mirrors the serving pipeline for one S x S tile: prompter -> point prompts (non-background anchors,
foreground >= min_foreground, point NMS) -> encoder -> decoder (prepare once, decode prompts in
batches) -> masks pasted into the frame -> overlaps resolved (higher score keeps contested pixels,
instances that keep less than half their area are dropped) -> label map and classes.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .prompt_learner import decode_prompts


def point_nms(points: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
    """Greedy suppression of points closer than radius, keeping the higher score."""
    order = np.argsort(-scores)
    kept = []
    for i in order:
        if not kept or np.min(np.hypot(*(points[kept] - points[i]).T)) >= radius:
            kept.append(i)
    return np.array(sorted(kept), dtype=np.int64)


@torch.no_grad()
def segment_tile(model, image: torch.Tensor, min_foreground: float = 0.5, nms_radius: float = 4.0,
                 batch: int = 64, mask_threshold: float = 0.0, points: Optional[np.ndarray] = None,
                 point_classes: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Dict[int, int]]:
    """image [1,3,S,S] normalised -> (label map [S,S] int32, {instance id: class index}).

    With `points` (x, y) given, they are the prompts (their classes `point_classes`), bypassing the
    prompter: validates the segmentation stage alone.
    """
    model.eval()
    size = image.shape[-1]
    device = image.device
    if points is None:
        out = model.detect(image)
        det = decode_prompts(out["points"], out["logits"], min_foreground)[0]
        pts = det["points"].cpu().numpy()
        scores = det["scores"].cpu().numpy()
        classes = det["classes"].cpu().numpy()
        keep = point_nms(pts, scores, nms_radius)
        pts, scores, classes = pts[keep], scores[keep], classes[keep]
    else:
        pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        scores = np.ones(len(pts), dtype=np.float32)
        classes = np.asarray(point_classes if point_classes is not None else np.zeros(len(pts)), dtype=np.int64)
    labels = np.zeros((size, size), dtype=np.int32)
    if len(pts) == 0:
        return labels, {}
    prepared = model.prepare(model.encode(image), image)
    masks, origins, ious = [], [], []
    for start in range(0, len(pts), batch):
        chunk = torch.from_numpy(np.clip(pts[start:start + batch], 0, size - 1e-3)).float().to(device)
        coords = chunk[:, None, :]
        point_labels = torch.ones(coords.shape[:2], device=device)
        mask_logits, origin, iou, _, _ = model.decode_prompts(*prepared, coords, point_labels)
        masks.append((mask_logits > mask_threshold).cpu().numpy())
        origins.append(origin.cpu().numpy())
        ious.append(iou.cpu().numpy())
    masks, origins, ious = np.concatenate(masks), np.concatenate(origins), np.concatenate(ious)
    quality = np.clip(ious, 0, 1) * scores
    order = np.argsort(-quality)
    result_classes: Dict[int, int] = {}
    next_id = 1
    win = masks.shape[-1]
    for i in order:
        x0, y0 = int(origins[i][0]), int(origins[i][1])
        region = labels[y0:y0 + win, x0:x0 + win]
        mask = masks[i][: region.shape[0], : region.shape[1]]
        area = int(mask.sum())
        if area == 0:
            continue
        free = mask & (region == 0)
        if free.sum() < 0.5 * area:
            continue
        region[free] = next_id
        result_classes[next_id] = int(classes[i])
        next_id += 1
    return labels, result_classes
