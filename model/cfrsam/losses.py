"""Stage-2 (SAM adaptation) losses, paper §3.7.

    L = L_mask(coarse) + L_mask(refined) + lambda_b * L_boundary
    L_mask = 20 * focal + dice + MSE(predicted IoU, IoU of the thresholded mask)

Conventions:
- Masks are per prompt: logits and targets [P,H,W] (or [P,1,H,W]); targets binary (0/1) or soft.
- Each loss averages over pixels within a mask, then over masks (`reduction="mean"`), so a big
  nucleus and a small one weigh the same; `reduction="none"` gives the per-mask values [P].
- Coarse logits live at 1/4 resolution. Their targets are the full-resolution targets area-
  downsampled (4x4 average pooling), giving soft targets with the exact covered fraction; that is
  16x cheaper than upsampling the logits and does not reward the blur of bilinear upsampling.
  `coarse_targets="upsample"` instead upsamples the logits to full resolution (segment-anything's way).
- There is one IoU prediction per prompt (SAM's IoU head) but two masks. The served score is
  predicted IoU x class confidence of the *refined* mask, so by default the IoU head is supervised
  with the refined mask's IoU (counted once; `iou_on="coarse"` switches).
- Windowed training: BGMR refines a W x W window per prompt, so the refined and boundary targets
  are cropped from the full-frame targets with the same origins (`crop_windows`, shared with the
  model). Boundary targets are derived on the full frame before cropping, so the window edge does
  not create boundaries.
"""

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .modeling.bgmr import crop_windows

__all__ = [
    "sigmoid_focal_loss",
    "dice_loss",
    "mask_iou",
    "iou_prediction_loss",
    "mask_loss",
    "boundary_targets",
    "boundary_loss",
    "cfr_sam_loss",
    "crop_windows",
]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[P,H,W] or [P,1,H,W] -> [P,H*W]."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # not -1: P may be 0


def _reduce(per_mask: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_mask
    if reduction == "sum":
        return per_mask.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    # No prompts (an image without nuclei): zero that still carries the graph.
    return per_mask.sum() if per_mask.numel() == 0 else per_mask.mean()


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Focal loss (Lin et al.) on logits; alpha < 0 disables the class weighting."""
    logits, targets = _flat(logits), _flat(targets).to(logits.dtype)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return _reduce(loss.mean(dim=1), reduction)


def dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    prob, targets = torch.sigmoid(_flat(logits)), _flat(targets).to(logits.dtype)
    numerator = 2 * (prob * targets).sum(dim=1) + smooth
    denominator = prob.sum(dim=1) + targets.sum(dim=1) + smooth
    return _reduce(1 - numerator / denominator, reduction)


@torch.no_grad()
def mask_iou(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU [P] of (logits > threshold) against (targets > 0.5); 1 when both are empty."""
    pred = _flat(logits) > threshold
    gt = _flat(targets) > 0.5
    intersection = (pred & gt).sum(dim=1).to(logits.dtype)
    union = (pred | gt).sum(dim=1).to(logits.dtype)
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def iou_prediction_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    iou_pred: torch.Tensor,
    threshold: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """MSE between the predicted IoU [P] and the actual IoU of the thresholded prediction."""
    actual = mask_iou(logits.detach(), targets, threshold)
    return _reduce((iou_pred.reshape(-1) - actual) ** 2, reduction)


def mask_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    iou_pred: Optional[torch.Tensor] = None,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """SAM's mask loss: focal_weight * focal + dice_weight * dice (+ iou_weight * IoU MSE when
    iou_pred is given)."""
    loss = focal_weight * sigmoid_focal_loss(logits, target, reduction=reduction)
    loss = loss + dice_weight * dice_loss(logits, target, reduction=reduction)
    if iou_pred is not None:
        loss = loss + iou_weight * iou_prediction_loss(logits, target, iou_pred, reduction=reduction)
    return loss


@torch.no_grad()
def boundary_targets(instance_masks: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Binary boundary band of each mask: dilation minus erosion (max pooling).

    instance_masks [P,H,W] or [P,1,H,W], binary. The band is `width` pixels across the edge:
    width // 2 outside the mask and the rest inside (width 1: the inner contour). Pixels beyond
    the frame count as foreground for the erosion, so a nucleus cut by the frame edge gets no
    boundary along the edge. Returns float 0/1 in the input's shape.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    squeeze = instance_masks.dim() == 3
    x = (instance_masks.unsqueeze(1) if squeeze else instance_masks).float()
    x = (x > 0.5).float()
    outside, inside = width // 2, width - width // 2
    dilated = F.max_pool2d(x, 2 * outside + 1, stride=1, padding=outside) if outside > 0 else x
    eroded = -F.max_pool2d(-x, 2 * inside + 1, stride=1, padding=inside)
    band = dilated - eroded
    return band.squeeze(1) if squeeze else band


def boundary_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    dice_weight: float = 1.0,
    pos_weight: Optional[float] = None,
    max_pos_weight: float = 50.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Weighted BCE + dice on boundary maps [P,H,W].

    Boundary pixels are rare, so positives are up-weighted in the BCE: by `pos_weight`, or when
    None per mask by (negatives / positives), clamped to [1, max_pos_weight] (class-balanced, as in
    HED-style edge losses).
    """
    flat_logits, flat_targets = _flat(logits), _flat(targets).to(logits.dtype)
    if pos_weight is None:
        positives = flat_targets.sum(dim=1, keepdim=True)
        negatives = flat_targets.shape[1] - positives
        weight = (negatives / positives.clamp(min=1)).clamp(1.0, max_pos_weight)
    else:
        weight = torch.full_like(flat_targets[:, :1], float(pos_weight))
    pixel_weight = 1 + (weight - 1) * flat_targets
    bce = F.binary_cross_entropy_with_logits(flat_logits, flat_targets, weight=pixel_weight, reduction="none")
    loss = bce.mean(dim=1) + dice_weight * dice_loss(flat_logits, flat_targets, reduction="none")
    return _reduce(loss, reduction)


def cfr_sam_loss(
    coarse_logits: torch.Tensor,
    refined_logits: torch.Tensor,
    boundary_logits: torch.Tensor,
    target_masks: torch.Tensor,
    iou_pred: Optional[torch.Tensor],
    lambda_b: float = 1.0,
    window_origin: Optional[torch.Tensor] = None,
    boundary_width: int = 2,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    iou_on: str = "refined",
    coarse_targets: str = "downsample",
    coarse_in_window: bool = True,
) -> Dict[str, torch.Tensor]:
    """The stage-2 objective.

    coarse_logits [P,S/4,S/4]; refined_logits, boundary_logits [P,W,W] (W = S in full-frame mode);
    target_masks [P,S,S] binary, full frame; iou_pred [P] or None; window_origin [P,2] (x0, y0),
    required when W < S (the origins the model refined). lambda_b: the boundary weight (its value
    in the paper was lost in extraction; 1.0 is a neutral default).
    Returns {"loss": total (with grad), "coarse", "refined", "boundary", "iou" (detached)}.
    """
    if iou_on not in ("refined", "coarse"):
        raise ValueError(f"iou_on must be refined or coarse, got {iou_on!r}")
    targets = target_masks.reshape(target_masks.shape[0], target_masks.shape[-2], target_masks.shape[-1])
    targets = targets.to(coarse_logits.dtype)
    size = targets.shape[-1]
    coarse = coarse_logits.reshape(coarse_logits.shape[0], coarse_logits.shape[-2], coarse_logits.shape[-1])
    if coarse_targets == "downsample":
        factor = size // coarse.shape[-1]
        coarse_target = F.avg_pool2d(targets.unsqueeze(1), factor).squeeze(1)
    elif coarse_targets == "upsample":
        coarse = F.interpolate(coarse.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False).squeeze(1)
        coarse_target = targets
    else:
        raise ValueError(f"coarse_targets must be downsample or upsample, got {coarse_targets!r}")

    if coarse_in_window and window_origin is not None and coarse_targets == "downsample":
        # A nucleus covers well under 1% of the coarse frame; over the whole frame dice gives
        # almost no gradient and the coarse mask collapses to background. Scoring the coarse
        # mask inside the prompt's refinement window (10-30% foreground) keeps it learnable and
        # is where BGMR reads it.
        coarse_window = refined_logits.shape[-1]
        if coarse_window < size:
            coarse = crop_windows(coarse, window_origin, coarse_window, scale=size // coarse.shape[-1], shared=False)
            coarse_target = crop_windows(
                coarse_target, window_origin, coarse_window, scale=size // coarse_target.shape[-1], shared=False
            )
    boundary_target = boundary_targets(targets, boundary_width)
    window = refined_logits.shape[-1]
    refined_target = targets
    if window != size:
        if window_origin is None:
            raise ValueError(f"refined logits are {window} px but targets {size} px: pass window_origin")
        refined_target = crop_windows(targets, window_origin, window, shared=False)
        boundary_target = crop_windows(boundary_target, window_origin, window, shared=False)

    refined = refined_logits.reshape(refined_target.shape)
    weights = dict(focal_weight=focal_weight, dice_weight=dice_weight, iou_weight=iou_weight)
    coarse_term = mask_loss(coarse, coarse_target, iou_pred if iou_on == "coarse" else None, **weights)
    refined_term = mask_loss(refined, refined_target, iou_pred if iou_on == "refined" else None, **weights)
    boundary_term = boundary_loss(boundary_logits.reshape(boundary_target.shape), boundary_target)
    total = coarse_term + refined_term + lambda_b * boundary_term
    with torch.no_grad():
        if iou_pred is None:
            iou_term = torch.zeros((), dtype=total.dtype, device=total.device)
        else:
            iou_term = iou_prediction_loss(
                refined if iou_on == "refined" else coarse,
                refined_target if iou_on == "refined" else coarse_target,
                iou_pred,
            )
    return {
        "loss": total,
        "coarse": coarse_term.detach(),
        "refined": refined_term.detach(),
        "boundary": boundary_term.detach(),
        "iou": iou_term,
    }
