"""Whole-tile inference in PyTorch: the reference of what the services compute, used for validation.

Mirrors the serving pipeline for one S x S tile, rule for rule:

- prompter (services/prompter/src/pipeline.ts `decodeAnchors`): anchors with foreground
  1 - p(background) >= min_foreground, points clipped to [0, S], sorted by foreground (ties: anchor
  order), greedy point NMS in that order (a point closer than nms_radius to a kept one is dropped);
- gateway (`planTilePrompts`): a detection's class confidence is foreground x its class probability
  renormalised over the K classes, i.e. p(class) over all K+1 outputs;
- decoder: masks thresholded at logit > mask_threshold in the prompt's window;
- gateway assembly (packages/nuclei/src/instances/stitching.ts `resolveOverlaps`, options of
  services/gateway/src/config.ts): score = clamp(predicted IoU, 0, 1) x class confidence;
  candidates in decreasing score (ties: detection order); each mask first has its holes filled and
  keeps one 4-connected component (the one under its prompt point, else the largest); it then loses
  the pixels of instances already accepted, is dropped when that leaves nothing or less than
  `min_kept_fraction` (0.5) of its area, otherwise is reduced to one component again, and is
  dropped when smaller than `min_area_px` (4) pixels.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from scipy import ndimage

from .prompt_learner import decode_prompts
from .prompt_learner.point_refiner import mix_class_probabilities
from .prompt_learner.sharpness import normalised_tile_sharpness

# The gateway's defaults (services/gateway/src/config.ts, DEFAULT_OVERLAP_OPTIONS).
MIN_KEPT_FRACTION = 0.5
MIN_AREA_PX = 4


def point_nms(points: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
    """Greedy suppression of points closer than radius: in decreasing score order (ties: input order),
    a point closer than `radius` to one already kept is dropped. Returns the kept indices in that
    order (most confident first), as the prompter service does."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if not radius > 0:
        return order.astype(np.int64)
    kept = []
    r2 = float(radius) ** 2
    for i in order:
        if not kept or np.min(((points[kept] - points[i]) ** 2).sum(-1)) >= r2:
            kept.append(i)
    return np.array(kept, dtype=np.int64)


def keep_component(mask: np.ndarray, point: Optional[Tuple[float, float]]) -> np.ndarray:
    """The 4-connected component of `mask` under the point (x, y) in the mask's pixel frame
    (continuous coordinates, floored), else the largest (ties: first in raster order)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask if count == 1 else np.zeros_like(mask)
    keep = 0
    if point is not None:
        px, py = int(np.floor(point[0])), int(np.floor(point[1]))
        if 0 <= px < mask.shape[1] and 0 <= py < mask.shape[0]:
            keep = int(labels[py, px])
    if keep == 0:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes[0] = 0
        keep = int(np.argmax(sizes))
    return labels == keep


def resolve_overlaps(
    masks: np.ndarray,
    origins: np.ndarray,
    scores: np.ndarray,
    prompts: np.ndarray,
    size: Tuple[int, int],
    min_kept_fraction: float = MIN_KEPT_FRACTION,
    min_area_px: int = MIN_AREA_PX,
) -> Tuple[np.ndarray, np.ndarray]:
    """Non-overlapping instances from window masks, the gateway's rule.

    masks [N, W, W] bool (window pixels), origins [N, 2] (x0, y0) of each window in the frame,
    scores [N], prompts [N, 2] (x, y) frame coordinates, size (H, W) of the frame.
    Returns (label map [H, W] int32 with ids 1..M in acceptance order, candidate index of each id [M]).
    """
    h, w = size
    labels = np.zeros((h, w), dtype=np.int32)
    accepted = []
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    win_h, win_w = masks.shape[-2:]
    for i in order:
        x0, y0 = int(origins[i][0]), int(origins[i][1])
        # Paste: the window clipped to the frame.
        fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + win_w, w), min(y0 + win_h, h)
        if fx1 <= fx0 or fy1 <= fy0:
            continue
        window = masks[i][fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
        ys, xs = np.nonzero(window)
        if len(xs) == 0:
            continue
        # Crop to the foreground's box, fill holes, keep the component under the prompt.
        bx0, by0 = fx0 + int(xs.min()), fy0 + int(ys.min())
        box = window[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        box = ndimage.binary_fill_holes(box)
        point = (float(prompts[i][0]) - bx0, float(prompts[i][1]) - by0)
        box = keep_component(box, point)
        own = int(box.sum())
        if own == 0:
            continue
        region = labels[by0 : by0 + box.shape[0], bx0 : bx0 + box.shape[1]]
        free = box & (region == 0)
        kept = int(free.sum())
        if kept < own:
            if kept == 0 or kept < min_kept_fraction * own:
                continue
            free = keep_component(free, point)
        if int(free.sum()) < min_area_px:
            continue
        accepted.append(int(i))
        region[free] = len(accepted)
    return labels, np.array(accepted, dtype=np.int64)


def score_bar(model, image: torch.Tensor) -> float:
    """The point refiner's score bar for one normalised tile [1, 3, S, S]: its `min_score`, or the blur
    gate's `blurred_min_score` where the tile's sharpness is below the gate (the prompter's
    `focus`)."""
    cfg = model.point_refiner.cfg
    if cfg.blur_gate > 0:
        pixels = image[0].float().cpu().numpy()
        if normalised_tile_sharpness(pixels, model.config.pixel_mean, model.config.pixel_std) < cfg.blur_gate:
            return cfg.blurred_min_score
    return cfg.min_score


@torch.no_grad()
def detect_points(model, image: torch.Tensor, min_foreground: float, nms_radius: float, class_probs: bool = False):
    """The prompter service's detections for one tile: (points [P, 2], classes [P], class
    confidence [P] = p(class) over K+1, foreground [P]), most confident (foreground) first; with a
    point refiner, the points refined, verified and their classes mixed with the refiner's. With
    `class_probs`, a fifth item: the served probabilities over the K classes [P, K]."""
    size = image.shape[-1]
    out = model.detect(image)
    det = decode_prompts(out["points"], out["logits"], min_foreground)[0]
    pts = np.clip(det["points"].float().cpu().numpy(), 0, size)
    foreground = det["foreground"].float().cpu().numpy()
    keep = point_nms(pts, foreground, nms_radius)
    pts = pts[keep]
    classes, scores = det["classes"].cpu().numpy()[keep], det["scores"].float().cpu().numpy()[keep]
    # The learner's probabilities over the K classes (renormalised without background).
    probs = out["logits"][0].float().softmax(-1)[det["anchor_index"][keep]][:, :-1].cpu()
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    refiner = getattr(model, "point_refiner", None)
    if refiner is not None and len(pts):
        # As the prompter service: the kept points moved onto their nuclei's centres, those the
        # refiner's score head says are on no nucleus dropped, then those that converged on one
        # nucleus merged (keep is still in foreground order).
        refined, on_nucleus, refiner_probs = model.refine_and_score_points(
            image, torch.from_numpy(pts).to(image.device, image.dtype)
        )
        if refiner.cfg.class_weight > 0:
            probs = mix_class_probabilities(probs, refiner_probs.float().cpu(), refiner.cfg.class_weight)
            classes = probs.argmax(-1).numpy()
            scores = foreground[keep] * probs.max(-1).values.numpy()
        pts = refined.float().cpu().numpy()
        verified = np.flatnonzero(on_nucleus.float().cpu().numpy() >= score_bar(model, image))
        again = verified[point_nms(pts[verified], foreground[keep][verified], refiner.cfg.nms_radius)]
        pts, keep, classes, scores, probs = pts[again], keep[again], classes[again], scores[again], probs[again]
    detections = (pts, classes, scores, foreground[keep])
    return detections + (probs.numpy(),) if class_probs else detections


def neighbours_within(points: np.ndarray, count: int, radius: float) -> List[List[int]]:
    """For each point, the indices of up to `count` other points within `radius` px, nearest first
    (ties by index): the neighbours a prompt gets as negative points, in training and serving."""
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if count <= 0 or len(points) < 2:
        return [[] for _ in range(len(points))]
    distance = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
    np.fill_diagonal(distance, np.inf)
    return [[int(j) for j in np.argsort(row, kind="stable") if row[j] <= radius][:count] for row in distance]


def negative_prompts(points: np.ndarray, count: int, radius: float) -> Tuple[np.ndarray, np.ndarray]:
    """Each prompt's point plus its `neighbours_within` as negative points: coords [P, 1 + count, 2],
    labels [P, 1 + count] (1 the prompt's own point, 0 a neighbour, -1 padding placed on the
    prompt's point)."""
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    coords = np.repeat(points[:, None, :], 1 + count, axis=1)
    labels = -np.ones((len(points), 1 + count), dtype=np.float32)
    labels[:, 0] = 1.0
    for i, near in enumerate(neighbours_within(points, count, radius)):
        coords[i, 1 : 1 + len(near)] = points[near]
        labels[i, 1 : 1 + len(near)] = 0.0
    return coords, labels


@torch.no_grad()
def decode_batches(model, prepared, coords: np.ndarray, labels: np.ndarray, batch: int = 64, device="cpu"):
    """The decoder on a prepared tile's prompts, `batch` at a time (coords [P, N, 2], labels [P, N]):
    yields (mask logits [n, W, W] float32, window origins [n, 2], predicted IoUs [n]) as numpy arrays,
    in prompt order. Callers threshold or keep the logits batch by batch."""
    for start in range(0, len(coords), batch):
        point_coords = torch.from_numpy(coords[start : start + batch]).float().to(device)
        point_labels = torch.from_numpy(labels[start : start + batch]).float().to(device)
        mask_logits, origin, iou, _, _ = model.decode_prompts(*prepared, point_coords, point_labels)
        yield mask_logits.float().cpu().numpy(), origin.cpu().numpy(), iou.float().cpu().numpy()


@torch.no_grad()
def segment_tile(
    model,
    image: torch.Tensor,
    min_foreground: float = 0.5,
    nms_radius: float = 4.0,
    batch: int = 64,
    mask_threshold: Optional[float] = None,
    points: Optional[np.ndarray] = None,
    point_classes: Optional[np.ndarray] = None,
    min_kept_fraction: float = MIN_KEPT_FRACTION,
    min_area_px: int = MIN_AREA_PX,
    negatives: int = 0,
    negative_radius: float = 24.0,
) -> Tuple[np.ndarray, Dict[int, int]]:
    """image [1,3,S,S] normalised -> (label map [S,S] int32, {instance id: class index}).

    With `points` (x, y) given, they are the prompts (their classes `point_classes`), bypassing the
    prompter: validates the segmentation stage alone. `mask_threshold` (a logit) defaults to the
    config's, the one the decoder service applies.
    """
    if mask_threshold is None:
        mask_threshold = model.config.mask_threshold
    model.eval()
    size = image.shape[-1]
    device = image.device
    if points is None:
        pts, classes, scores, _ = detect_points(model, image, min_foreground, nms_radius)
    else:
        pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        scores = np.ones(len(pts), dtype=np.float32)
        classes = np.asarray(point_classes if point_classes is not None else np.zeros(len(pts)), dtype=np.int64)
    if len(pts) == 0:
        return np.zeros((size, size), dtype=np.int32), {}
    prepared = model.prepare(model.encode(image), image)
    all_coords, all_labels = negative_prompts(np.clip(pts, 0, size - 1e-3), negatives, negative_radius)
    masks, origins, ious = [], [], []
    for mask_logits, origin, iou in decode_batches(model, prepared, all_coords, all_labels, batch, device):
        masks.append(mask_logits > mask_threshold)
        origins.append(origin)
        ious.append(iou)
    masks, origins, ious = np.concatenate(masks), np.concatenate(origins), np.concatenate(ious)
    quality = np.clip(np.nan_to_num(ious, nan=0.0), 0, 1) * scores
    labels, accepted = resolve_overlaps(masks, origins, quality, pts, (size, size), min_kept_fraction, min_area_px)
    return labels, {k + 1: int(classes[i]) for k, i in enumerate(accepted)}
