"""Point refinement: each kept prompt point moved onto its nucleus' centre at full resolution.

The prompt learner places its points from stride-4 features and anchors every 8 px; its points sit
3.5 px from the nucleus centre on average, and the segmentation stage loses about 0.07 bPQ to that
(docs/model-history.md). The refiner looks at a `crop` x `crop` window of the tile's pixels centred
on each kept point (rounded), computes a heat map of where the centre of the nucleus under the window's
centre is, and returns its expectation (soft-argmax, sub-pixel). It runs per kept point, after the
prompter's NMS, so its cost scales with the nuclei, not with the 1024 anchors.

Coordinates follow the prompt learner's convention: (x, y) input pixels, pixel centres at +0.5.
"""

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modeling.bgmr import crop_windows


@dataclass(frozen=True)
class PointRefinerConfig:
    """Everything that fixes the refiner's architecture."""

    crop: int = 48
    width: int = 32
    stem_width: int = 16
    dilations: tuple = (1, 2, 4)
    # Refined points closer than this (px) prompt the same nucleus: the less confident is dropped
    # (the prompter's NMS ran on the unrefined points, which may converge).
    nms_radius: float = 4.0
    # A second head: the probability that the point lies on a nucleus at all (a verifier at full
    # resolution of the prompter's stride-4 foreground), read from the features at the heat map's
    # peak and over the crop. Points scoring below `min_score` are dropped (0: none are).
    score_head: bool = False
    score_hidden: int = 32
    min_score: float = 0.0
    # The blur gate: on a tile whose sharpness (prompt_learner/sharpness.py) is below `blur_gate`,
    # the bar is `blurred_min_score` instead (0: no gate). Blurred nuclei score low, and the served
    # bar drops them; a lower bar on sharp tiles would let false points through.
    blur_gate: float = 0.0
    blurred_min_score: float = 0.0
    # A third head: the nucleus' class (K logits) from the same features, at full resolution where
    # the prompt learner sees stride-4 features. Served classes mix the two: p ~ p_learner^(1 - w)
    # x p_refiner^w over the K classes, w = `class_weight` (0: the prompt learner's alone).
    num_classes: int = 0
    class_weight: float = 0.0
    # What the score and class heads read besides the heat map's features (0: nothing more). The
    # crop is 48 px, about one nucleus: whether a blob is a nucleus also shows in what surrounds it.
    # `context_crop`: a wider window (px) around the point, read at half resolution by its own small
    # net (`context_width` channels at 1/8 of the window). `head_branch`: a stride-2 branch of that
    # many channels on the heat map's features, for more capacity than their two pooled vectors.
    context_crop: int = 0
    context_width: int = 32
    head_branch: int = 0

    def __post_init__(self) -> None:
        if self.crop % 4 != 0 or self.crop < 16:
            raise ValueError(f"crop must be a multiple of 4 and >= 16, got {self.crop}")
        if self.context_crop and (self.context_crop % 8 != 0 or self.context_crop < self.crop):
            raise ValueError(f"context_crop must be a multiple of 8 and >= crop, got {self.context_crop}")
        if self.blur_gate < 0 or not 0 <= self.blurred_min_score <= 1:
            raise ValueError(
                f"blur_gate must be >= 0 and blurred_min_score in [0, 1], got {self.blur_gate}, {self.blurred_min_score}"
            )

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "PointRefinerConfig":
        values = dict(values)
        if "dilations" in values:
            values["dilations"] = tuple(values["dilations"])
        return cls(**values)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout))


class PointRefiner(nn.Module):
    """crops [P, 3, C, C] (normalised pixels) -> offsets [P, 2] (x, y) of the centre from the crop's
    centre, in input pixels; `refine(image, points)` does the cropping."""

    def __init__(self, cfg: PointRefinerConfig = PointRefinerConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = _conv_bn_relu(3, cfg.stem_width)
        self.down = _conv_bn_relu(cfg.stem_width, cfg.width, stride=2)
        self.context = nn.Sequential(*[_conv_bn_relu(cfg.width, cfg.width, dilation=d) for d in cfg.dilations])
        self.head = nn.Conv2d(cfg.width, 1, 1)
        heads = cfg.score_head or cfg.num_classes > 0
        # Both heads read the same pooled features: 2 x width (at the heat map's peak, and the mean),
        # then mean and max of the optional context net and head branch.
        pooled = 2 * cfg.width
        self.context_net = None
        if heads and cfg.context_crop:
            self.context_net = nn.Sequential(
                _conv_bn_relu(3, cfg.stem_width, stride=2),
                _conv_bn_relu(cfg.stem_width, cfg.context_width, stride=2),
                _conv_bn_relu(cfg.context_width, cfg.context_width, dilation=2),
            )
            pooled += 2 * cfg.context_width
        self.head_branch = None
        if heads and cfg.head_branch:
            self.head_branch = nn.Sequential(
                _conv_bn_relu(cfg.width, cfg.head_branch, stride=2),
                _conv_bn_relu(cfg.head_branch, cfg.head_branch, dilation=2),
            )
            pooled += 2 * cfg.head_branch
        self.score = _mlp(pooled, cfg.score_hidden, 1) if cfg.score_head else None
        self.classify = _mlp(pooled, cfg.score_hidden, cfg.num_classes) if cfg.num_classes else None
        half = cfg.crop // 2
        # Heat-map cell centres (stride 2) relative to the crop's centre, in input pixels.
        steps = torch.arange(half, dtype=torch.float32) * 2.0 + 1.0 - half
        self.register_buffer("cell_x", steps.view(1, 1, half).expand(1, half, half).reshape(1, -1).clone())
        self.register_buffer("cell_y", steps.view(1, half, 1).expand(1, half, half).reshape(1, -1).clone())

    def heat_logits(self, crops: torch.Tensor) -> torch.Tensor:
        """[P, (C/2)^2] logits over the stride-2 cells of each crop (row-major)."""
        return self._heat_map(crops)[1]

    def _heat_map(self, crops: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(features [P, width, C/2, C/2], heat-map logits [P, (C/2)^2])."""
        features = self.context(self.down(self.stem(crops)))
        return features, self.head(features).flatten(1).float()

    def heads(
        self, crops: torch.Tensor, context: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """([P, (C/2)^2] heat-map logits, [P] on-a-nucleus logits, [P, K] class logits); the last two
        None without their heads. `context`: the context crops (`context_crops`) when configured."""
        features, logits = self._heat_map(crops)
        if self.score is None and self.classify is None:
            return logits, None, None
        cells = features.flatten(2).float()  # [P, width, (C/2)^2]
        # What is at the predicted centre (the heat map's weights) and around it.
        at_peak = torch.bmm(cells, logits.softmax(-1).unsqueeze(-1)).squeeze(-1)
        parts = [at_peak, cells.mean(-1)]
        if self.context_net is not None:
            if context is None:
                raise ValueError("this refiner's heads read context crops (context_crop is set); pass them")
            parts.extend(_mean_and_max(self.context_net(context)))
        if self.head_branch is not None:
            parts.extend(_mean_and_max(self.head_branch(features)))
        pooled = torch.cat(parts, dim=-1)
        score = self.score(pooled).squeeze(-1).float() if self.score is not None else None
        classes = self.classify(pooled).float() if self.classify is not None else None
        return logits, score, classes

    def expectation(self, logits: torch.Tensor) -> torch.Tensor:
        """Soft-argmax: [P, 2] (x, y) offsets from the crop's centre, input pixels."""
        weights = logits.softmax(-1)
        return torch.stack(((weights * self.cell_x).sum(-1), (weights * self.cell_y).sum(-1)), dim=-1)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.expectation(self.heat_logits(crops))

    def target_distribution(self, offsets: torch.Tensor, sigma: float) -> torch.Tensor:
        """[P, (C/2)^2]: a Gaussian of `sigma` px around each target offset, over the cells."""
        d2 = (self.cell_x - offsets[:, :1]) ** 2 + (self.cell_y - offsets[:, 1:]) ** 2
        return (-d2 / (2 * sigma**2)).softmax(-1)

    def crop_origins(self, points: torch.Tensor, size: int) -> torch.Tensor:
        """[P, 2] integer corner floor(p) each point's crop is centred on, inside the [0, S) frame.
        It is also the crop's top-left (x0, y0) in the image padded by C/2 on every side."""
        return torch.floor(points).long().clamp(0, size - 1)

    def crops(self, image: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """image [N, 3, S, S], points [P, 2], image_index [P] -> [P, 3, C, C]: the window covering
        [floor(p) - C/2, floor(p) + C/2) on each axis (zeros beyond the image)."""
        return self._windows(image, points, image_index, self.cfg.crop)

    def _windows(self, image: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor, side: int) -> torch.Tensor:
        """[P, 3, side, side]: the window [floor(p) - side/2, floor(p) + side/2) of each point."""
        half = side // 2
        padded = F.pad(image, (half, half, half, half))
        origins = self.crop_origins(points, image.shape[-1])
        return crop_windows(padded, origins, side, image_index=image_index.long())

    def context_crops(
        self, image: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """[P, 3, W/2, W/2]: the `context_crop` window W around each point (same corner rule as
        `crops`), average-pooled 2x; None when the heads read no context."""
        if self.context_net is None:
            return None
        return F.avg_pool2d(self._windows(image, points, image_index, self.cfg.context_crop), 2)

    def refine(
        self, image: torch.Tensor, points: torch.Tensor, image_index: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Refined points [P, 2] for points [P, 2] on image [N, 3, S, S] (image_index [P], default
        0), inside the frame [0, S]."""
        return self.refine_and_score(image, points, image_index)[0]

    def refine_and_score(
        self, image: torch.Tensor, points: torch.Tensor, image_index: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(refined points [P, 2], on-a-nucleus probability [P], class probabilities [P, K']): ones
        without the score head, and K' = 1 (a single 1) without the class head."""
        if image_index is None:
            image_index = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
        size = image.shape[-1]
        centres = self.crop_origins(points, size).to(points.dtype)
        logits, score_logits, class_logits = self.heads(
            self.crops(image, points, image_index), self.context_crops(image, points, image_index)
        )
        refined = (centres + self.expectation(logits).to(points.dtype)).clamp(0, size)
        scores = torch.ones_like(refined[:, 0]) if score_logits is None else score_logits.sigmoid().to(points.dtype)
        classes = torch.ones_like(refined[:, :1]) if class_logits is None else class_logits.softmax(-1).to(points.dtype)
        return refined, scores, classes


def _mean_and_max(features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    cells = features.flatten(2).float()
    return cells.mean(-1), cells.amax(-1)


def mix_class_probabilities(learner: torch.Tensor, refiner: torch.Tensor, weight: float) -> torch.Tensor:
    """[P, K] class probabilities served: the prompt learner's (over the K classes) and the point
    refiner's mixed geometrically, p ~ learner^(1 - weight) x refiner^weight, renormalised. The
    prompter service computes the same (services/prompter/src/pipeline.ts)."""
    if weight <= 0 or refiner.shape[-1] != learner.shape[-1]:
        return learner
    eps = 1e-12
    mixed = torch.exp((1 - weight) * torch.log(learner.clamp_min(eps)) + weight * torch.log(refiner.clamp_min(eps)))
    return mixed / mixed.sum(-1, keepdim=True)


class PointRefinerGraph(nn.Module):
    """The `point_refiner` ONNX graph: (image [B,3,S,S], points [P,2], image_index [P] int64) ->
    (refined_points [P,2], point_scores [P]: the probability that each point is on a nucleus, ones
    for a refiner without the score head; point_class_probs [P,K']: the nucleus' class, [P,1] ones
    without the class head). The prompter service runs it on the points its NMS kept."""

    output_names: Tuple[str, ...] = ("refined_points", "point_scores", "point_class_probs")

    def __init__(self, refiner: PointRefiner) -> None:
        super().__init__()
        self.refiner = refiner

    def forward(self, image: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor):
        return self.refiner.refine_and_score(image, points, image_index)
