"""Stage-1 training loss (CFR-SAM §3.3.2, eq. for L_prompt):

    L = w_cls * CE(logits, targets; background weight, optional per-class weights)
      + w_reg * sum over matched anchors || p_i - x_j ||^2 / N
      + w_mask * Focal(foreground_logits, ground-truth foreground)

Defaults are the paper's and its reference prompter's (PromptNucSeg): the background class weight
("classification loss coefficient") is 0.4 for PanNuke, 0.25 for CPM-17 and 0.2 for MoNuSeg; the
regression loss is the squared error in input pixels summed over coordinates and matched pairs,
divided by the number of ground-truth nuclei, weighted 5e-3 (so 10 px of error costs 0.5); the
focal loss is binary, gamma 2, no alpha, averaged over pixels. `regression="smooth_l1"` is offered
for robustness to badly matched pairs early in training.

Dense regression (`dense_regression`, not in the paper): besides the matched anchor, more anchors
regress their point to a nucleus' centroid, with the same squared error, summed and divided by the
number of nuclei, weighted `dense_regression_weight`. Which anchors (by their position after the
offset net, before the regression head): "radius", every anchor within `dense_regression_radius`
px of a centroid, to the nearest one; "inside", every anchor that lies on a nucleus (the target's
`instances` map), to that nucleus' centroid. Why: the one-to-one matching trains the regression
of one anchor per nucleus, but at serving time the prompter keeps the anchor of highest
foreground after NMS, and on the validation tiles half of the kept points came from anchors the
matching had not picked. Their points had never been trained to move (6.7 px from the centroid on
average against 2.4 for matched ones), and the segmentation stage needs its prompt near the
centre. Classification stays one-to-one: the neighbours are still background there.

Classification targets: unmatched anchors are background (index K); an anchor matched to a nucleus
of class c gets c; one matched to a nucleus of unknown class (index < 0) gets the partial-label loss
-log(1 - p(background)), which teaches "this is a nucleus" without guessing which kind.

Quality targets (`quality_sigma` > 0, not in the paper; the idea of GFL's quality focal loss): an
unmatched anchor whose predicted point lies near a centroid is not plain background but a soft
target, nucleus (of that nucleus' class) with weight q = exp(-d^2 / (2 sigma^2)), d the point's
distance to the centroid (detached), background 1 - q. Why: the prompter keeps the anchor of highest
foreground after NMS, and the one-to-one targets give every neighbour of the matched anchor the same
"background", so nothing ranks the neighbours by where their points land; with quality targets the
foreground score orders them by it, and the kept point is the best placed one the network can tell.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .matcher import DISTANCE_WEIGHT, HungarianMatcher


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    alpha: Optional[float] = None,
) -> torch.Tensor:
    """Mean binary focal loss (Lin et al., 2017); targets in [0, 1]."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = bce * (1 - p_t).pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean()


def foreground_target(foreground: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Ground-truth foreground [B, H, W] or [B, 1, H, W] -> binary [B, 1, h, w] at `size`.

    Downsampling is by area: a low-resolution cell is foreground when at least half of it is.
    """
    if foreground.dim() == 3:
        foreground = foreground[:, None]
    foreground = foreground.float()
    if tuple(foreground.shape[-2:]) != tuple(size):
        foreground = F.interpolate(foreground, size=size, mode="area")
    return (foreground >= 0.5).float()


class PromptLearnerLoss(nn.Module):
    """Matching + classification, regression and auxiliary foreground losses.

    forward(outputs, targets) with `outputs` the PromptLearner dict and `targets` a dict with
    `centroids` (list of [N_b, 2] pixels), `classes` (list of [N_b], < 0 = unknown) and
    `foreground` ([B, H, W], any resolution that area-downsamples to the head's). Returns a dict of
    scalar tensors: loss (the total), loss_cls, loss_reg, loss_mask, and num_matched.
    """

    def __init__(
        self,
        background_weight: float = 0.4,
        classification_weight: float = 1.0,
        regression_weight: float = 5e-3,
        mask_weight: float = 1.0,
        regression: str = "l2",
        distance_weight: float = DISTANCE_WEIGHT,
        focal_gamma: float = 2.0,
        focal_alpha: Optional[float] = None,
        class_weights: Optional[Sequence[float]] = None,
        dense_regression: str = "",
        dense_regression_radius: float = 12.0,
        dense_regression_weight: Optional[float] = None,
        quality_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        if regression not in ("l2", "smooth_l1"):
            raise ValueError(f"regression must be 'l2' or 'smooth_l1', got {regression!r}")
        self.background_weight = background_weight
        self.classification_weight = classification_weight
        self.regression_weight = regression_weight
        self.mask_weight = mask_weight
        self.regression = regression
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        # Per nucleus class CE weights (rare classes up); None = 1 for every class.
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.matcher = HungarianMatcher(distance_weight=distance_weight)
        if dense_regression not in ("", "radius", "inside"):
            raise ValueError(f"dense_regression must be '', 'radius' or 'inside', got {dense_regression!r}")
        self.dense_regression = dense_regression
        self.dense_regression_radius = float(dense_regression_radius)
        self.dense_regression_weight = regression_weight if dense_regression_weight is None else dense_regression_weight
        if quality_sigma < 0:
            raise ValueError(f"quality_sigma must be >= 0, got {quality_sigma}")
        self.quality_sigma = float(quality_sigma)

    def classification_loss(
        self,
        logits: torch.Tensor,
        matches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
        classes: Sequence[torch.Tensor],
        points: Optional[torch.Tensor] = None,
        centroids: Optional[Sequence[torch.Tensor]] = None,
    ) -> torch.Tensor:
        b, a, k1 = logits.shape
        background = k1 - 1
        target = torch.full((b, a), background, dtype=torch.long, device=logits.device)
        for i, (anchor_idx, gt_idx) in enumerate(matches):
            target[i, anchor_idx] = classes[i].to(logits.device).long()[gt_idx]
        unknown = target < 0
        log_probs = logits.log_softmax(-1)
        known_target = target.clamp(min=0)
        nll = -log_probs.gather(-1, known_target[..., None])[..., 0]
        # -log(1 - p(background)), computed stably as -logsumexp over the nucleus classes.
        nll_nucleus = -torch.logsumexp(log_probs[..., :background], dim=-1)
        nll = torch.where(unknown, nll_nucleus, nll)
        if self.class_weights is None:
            nucleus_weight = torch.ones_like(nll)
        else:
            if len(self.class_weights) != background:
                raise ValueError(f"class_weights has {len(self.class_weights)} entries for {background} classes")
            table = torch.tensor(self.class_weights + [1.0], dtype=nll.dtype, device=nll.device)
            # Unknown-class nuclei (partial label) keep weight 1.
            nucleus_weight = torch.where(unknown, torch.ones_like(nll), table[known_target])
        weight = torch.where(
            known_target == background,
            torch.full_like(nll, self.background_weight),
            nucleus_weight,
        )
        if self.quality_sigma > 0 and points is not None and centroids is not None:
            nll = self._quality_nll(nll, log_probs, target, points, centroids, classes)
        return (weight * nll).sum() / weight.sum().clamp(min=1e-12)

    def _quality_nll(self, nll, log_probs, target, points, centroids, classes) -> torch.Tensor:
        """The background anchors' loss with quality targets: for an anchor whose point is d px from
        the nearest centroid, -(q log p(that nucleus' class) + (1 - q) log p(background)), q =
        exp(-d^2 / 2 sigma^2) (for a nucleus of unknown class, log p(nucleus) in place of the
        class). Anchors beyond 3 sigma keep the plain background loss; matched anchors are unchanged."""
        background = log_probs.shape[-1] - 1
        log_nucleus = torch.logsumexp(log_probs[..., :background], dim=-1)
        soft = nll.clone()
        for i, c in enumerate(centroids):
            if c.numel() == 0:
                continue
            c = c.to(points.device, torch.float32).reshape(-1, 2)
            distance, which = torch.cdist(points[i].detach().float(), c).min(dim=1)  # [A]
            near = (target[i] == background) & (distance <= 3 * self.quality_sigma)
            if not near.any():
                continue
            q = torch.exp(-(distance[near] ** 2) / (2 * self.quality_sigma**2)).to(log_probs.dtype)
            cls = classes[i].to(points.device).long()[which[near]]
            lp = log_probs[i, near]
            log_p_nucleus = torch.where(cls >= 0, lp.gather(-1, cls.clamp(min=0)[:, None])[:, 0], log_nucleus[i, near])
            soft[i, near] = -(q * log_p_nucleus + (1 - q) * lp[:, background])
        return soft

    def regression_loss(
        self,
        points: torch.Tensor,
        matches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
        centroids: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        num_gt = sum(int(c.shape[0]) for c in centroids)
        pred = torch.cat([points[i, anchor_idx] for i, (anchor_idx, _) in enumerate(matches)])
        gt = torch.cat(
            [
                centroids[i].to(points.device, points.dtype).reshape(-1, 2)[gt_idx]
                for i, (_, gt_idx) in enumerate(matches)
            ]
        )
        return self._point_error(pred, gt) / max(num_gt, 1)

    def _point_error(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Summed squared (or smooth L1) error of points in pixels."""
        if self.regression == "l2":
            return F.mse_loss(pred, gt, reduction="sum")
        return F.smooth_l1_loss(pred, gt, reduction="sum", beta=1.0)

    def dense_regression_loss(
        self,
        points: torch.Tensor,
        anchors: torch.Tensor,
        centroids: Sequence[torch.Tensor],
        instances: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Squared error of the points of the anchors near (or on) a nucleus to its centroid."""
        num_gt = sum(int(c.shape[0]) for c in centroids)
        total = points.new_zeros(())
        for i, c in enumerate(centroids):
            if c.numel() == 0:
                continue
            c = c.to(points.device, points.dtype).reshape(-1, 2)
            where = anchors[i].detach()
            if self.dense_regression == "inside":
                if instances is None:
                    raise ValueError("dense regression 'inside' needs the targets' instances map")
                h, w = instances.shape[-2:]
                x = where[:, 0].floor().long().clamp(0, w - 1)
                y = where[:, 1].floor().long().clamp(0, h - 1)
                # Instance k of the map is centroid k - 1 (the dataset's numbering); 0 is background.
                which = instances[i].to(points.device)[y, x].long() - 1
                near = (which >= 0) & (which < len(c))
                which = which.clamp(min=0)
            else:
                nearest, which = torch.cdist(where.to(points.dtype), c).min(dim=1)  # [A]
                near = nearest <= self.dense_regression_radius
            if near.any():
                total = total + self._point_error(points[i, near], c[which[near]])
        return total / max(num_gt, 1)

    def forward(self, outputs: Dict[str, torch.Tensor], targets: Dict) -> Dict[str, torch.Tensor]:
        points, logits = outputs["points"], outputs["logits"]
        centroids: List[torch.Tensor] = list(targets["centroids"])
        classes: List[torch.Tensor] = list(targets["classes"])
        background = logits.shape[-1] - 1
        for c in classes:
            if c.numel() and int(c.max()) >= background:
                raise ValueError(f"target class {int(c.max())} out of range for {background} nucleus classes")
        matches = self.matcher(points, logits, centroids, classes)

        loss_cls = self.classification_loss(logits, matches, classes, points, centroids)
        loss_reg = self.regression_loss(points, matches, centroids)
        fg_logits = outputs["foreground_logits"]
        fg_target = foreground_target(targets["foreground"].to(fg_logits.device), fg_logits.shape[-2:])
        loss_mask = sigmoid_focal_loss(fg_logits, fg_target, self.focal_gamma, self.focal_alpha)

        total = self.classification_weight * loss_cls + self.regression_weight * loss_reg + self.mask_weight * loss_mask
        extra = {}
        if self.dense_regression:
            extra["loss_reg_dense"] = self.dense_regression_loss(
                points, outputs["anchors"], centroids, targets.get("instances")
            )
            total = total + self.dense_regression_weight * extra["loss_reg_dense"]
        num_matched = torch.tensor(float(sum(int(m[0].numel()) for m in matches)), device=logits.device)
        return {
            "loss": total,
            "loss_cls": loss_cls,
            "loss_reg": loss_reg,
            "loss_mask": loss_mask,
            **extra,
            "num_matched": num_matched,
        }
