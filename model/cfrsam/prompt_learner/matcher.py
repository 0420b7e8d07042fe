"""One-to-one assignment of anchors to ground-truth nucleus centroids (CFR-SAM §3.3.2).

The score of assigning anchor i to nucleus j is

    s(i, j) = softmax(logits_i)[c_j] - lambda * || p_i - x_j ||_2

and the Hungarian algorithm picks the assignment of maximal total score. The paper's prose does not
say in which units the distance is measured; we use input pixels, as the PromptNucSeg prompter that
CFR-SAM follows does (`torch.cdist` on pixel coordinates, `set_cost_point = 0.1`). That is also the
only reading under which lambda = 0.1 means something: in pixels, 10 px of distance weighs as much
as the whole probability range, so nearby anchors win and the class term breaks ties between them;
in coordinates normalised by the image side, the distance term would be at most 0.14 and matching
would ignore geometry. p_i is the anchor's final position (after the regression head).

Nuclei whose class is unknown (index < 0, e.g. datasets annotated without classes) use the
probability of "any nucleus class", 1 - p(background), in place of p(c_j).
"""

from typing import List, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

DISTANCE_WEIGHT = 0.1


def match_cost(
    probs: np.ndarray,
    points: np.ndarray,
    centroids: np.ndarray,
    classes: np.ndarray,
    distance_weight: float = DISTANCE_WEIGHT,
    class_weight: float = 1.0,
) -> np.ndarray:
    """[A, N] cost (the negated score) of assigning each anchor to each nucleus."""
    background = probs.shape[1] - 1
    classes = np.asarray(classes, dtype=np.int64)
    known = classes >= 0
    class_prob = np.empty((probs.shape[0], len(classes)), dtype=np.float64)
    class_prob[:, known] = probs[:, classes[known]]
    class_prob[:, ~known] = (1.0 - probs[:, background])[:, None]
    distance = np.linalg.norm(points[:, None, :] - centroids[None, :, :], axis=-1)
    return distance_weight * distance - class_weight * class_prob


def match_anchors(
    probs: np.ndarray,
    points: np.ndarray,
    centroids: np.ndarray,
    classes: np.ndarray,
    distance_weight: float = DISTANCE_WEIGHT,
    class_weight: float = 1.0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Optimal assignment for one image.

    probs [A, K+1] class probabilities, points [A, 2] anchor positions (pixels), centroids [N, 2]
    (pixels), classes [N] (K-class indices, < 0 for unknown). Returns (anchor_idx, gt_idx), int64,
    each of length min(A, N), sorted by anchor index. With N > A (more nuclei than anchors) the
    nuclei left out get no anchor.
    """
    if len(centroids) == 0 or len(points) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    cost = match_cost(
        np.asarray(probs, dtype=np.float64),
        np.asarray(points, dtype=np.float64),
        np.asarray(centroids, dtype=np.float64),
        classes,
        distance_weight,
        class_weight,
    )
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


class HungarianMatcher:
    """Batched `match_anchors` on model outputs (no gradient)."""

    def __init__(self, distance_weight: float = DISTANCE_WEIGHT, class_weight: float = 1.0) -> None:
        self.distance_weight = distance_weight
        self.class_weight = class_weight

    @torch.no_grad()
    def __call__(
        self,
        points: torch.Tensor,
        logits: torch.Tensor,
        centroids: Sequence[torch.Tensor],
        classes: Sequence[torch.Tensor],
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """points [B, A, 2], logits [B, A, K+1], per-image centroids [N_b, 2] and classes [N_b].

        Returns per image (anchor_idx, gt_idx) as int64 tensors on the device of `points`.
        """
        probs = logits.detach().double().softmax(-1).cpu().numpy()
        pts = points.detach().double().cpu().numpy()
        matches = []
        for b in range(points.shape[0]):
            rows, cols = match_anchors(
                probs[b],
                pts[b],
                _numpy(centroids[b]).reshape(-1, 2),
                _numpy(classes[b]).reshape(-1),
                self.distance_weight,
                self.class_weight,
            )
            matches.append(
                (
                    torch.as_tensor(rows, dtype=torch.int64, device=points.device),
                    torch.as_tensor(cols, dtype=torch.int64, device=points.device),
                )
            )
        return matches


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
