"""The stage-1 prompt learner: learnable anchor points -> nucleus centroid prompts with classes.

Coordinates are continuous input pixels with the pixel-centre convention: the image covers
[0, S] x [0, S] and the centre of pixel (row i, column j) is (x, y) = (j + 0.5, i + 0.5). With
`F.grid_sample(align_corners=False)` the normalised coordinate of x is simply 2 x / S - 1 on every
FPN level, since each level's cells tile the same [0, S] square.

Anchor order (the A axis of every output): row-major over the anchor grid (y, then x), then the
anchor's slot inside its cell.
"""

import math
import warnings
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modeling.deform_conv import static_dim
from .config import PromptLearnerConfig
from .convnext import ConvNeXt
from .fpn import FPN


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear, on the last dimension."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


def uniform_anchor_grid(input_size: int, stride: int, per_cell: int) -> torch.Tensor:
    """[A, 2] anchor positions (x, y) in input pixels, uniformly spread over the image.

    One anchor per cell sits at the cell centre. With per_cell = m * m anchors they sit on an m x m
    sub-grid of the cell; any other count is spread evenly along the cell's diagonal.
    """
    grid = input_size // stride
    m = int(round(math.sqrt(per_cell)))
    if m * m == per_cell:
        sub = [((j + 0.5) / m, (k + 0.5) / m) for k in range(m) for j in range(m)]
    else:
        sub = [((k + 0.5) / per_cell, (k + 0.5) / per_cell) for k in range(per_cell)]
    sub = torch.tensor(sub, dtype=torch.float32)  # [n, 2] (x, y) fractions of a cell
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    corners = torch.stack([xs, ys], dim=-1).float()  # [G, G, 2]
    anchors = (corners[:, :, None, :] + sub[None, None]) * stride  # [G, G, n, 2]
    return anchors.reshape(-1, 2)


class PromptLearner(nn.Module):
    """ConvNeXt + FPN + anchor points, as in CFR-SAM §3.3.1.

    forward(image [B, 3, S, S], normalised) returns a dict:
      points             [B, A, 2]  final positions (x, y, input pixels): anchors + regression
      logits             [B, A, K+1] class logits, index K = background
      foreground_logits  [B, 1, S/4, S/4] auxiliary foreground mask logits
      anchors            [B, A, 2]  anchor positions after the offset net

    `anchor_points` ([A, 2], input pixels) are a parameter when `cfg.learnable_anchors` (the paper's
    learnable anchors; they are initialised on the uniform grid and, being in pixels, move slowly
    under Adam: give them their own learning rate if they should move more), else a buffer.
    The input size is fixed by the config because the anchors are defined in its pixels.
    """

    def __init__(self, cfg: PromptLearnerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ConvNeXt(
            dims=cfg.backbone_dims,
            depths=cfg.backbone_depths,
            drop_path=cfg.drop_path,
            layer_scale_init=cfg.layer_scale_init,
        )
        self.fpn = FPN(cfg.backbone_dims, cfg.fpn_dim, cfg.fpn_levels)

        anchors = uniform_anchor_grid(cfg.input_size, cfg.anchor_stride, cfg.anchors_per_cell)
        if cfg.learnable_anchors:
            self.anchor_points = nn.Parameter(anchors)
        else:
            self.register_buffer("anchor_points", anchors)

        self.offset_head = MLP(cfg.fpn_dim, cfg.head_dim, 2, cfg.dropout)
        self.fusion = nn.Conv2d(
            cfg.fpn_dim * cfg.fpn_levels,
            cfg.head_dim,
            kernel_size=cfg.fusion_kernel,
            padding=cfg.fusion_kernel // 2,
        )
        self.regression_head = MLP(cfg.head_dim, cfg.head_dim, 2, cfg.dropout)
        self.classification_head = MLP(cfg.head_dim, cfg.head_dim, cfg.num_classes + 1, cfg.dropout)
        self.foreground_head = nn.Sequential(
            nn.Conv2d(cfg.fpn_dim, cfg.mask_dim, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cfg.mask_dim),
            nn.ReLU(),
            nn.Conv2d(cfg.mask_dim, cfg.mask_dim, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cfg.mask_dim),
            nn.ReLU(),
            nn.Conv2d(cfg.mask_dim, 1, kernel_size=1),
        )
        self._init_heads()

    def _init_heads(self) -> None:
        # Both offsets start at zero, so training starts from the uniform grid rather than from
        # random jumps that the matcher would then chase.
        for head in (self.offset_head, self.regression_head):
            nn.init.zeros_(head.fc2.weight)
            nn.init.zeros_(head.fc2.bias)
        # Focal-loss prior: start at p(foreground) = 0.1 so the early loss is not dominated by the
        # (mostly background) pixels.
        nn.init.constant_(self.foreground_head[-1].bias, -math.log((1 - 0.1) / 0.1))

    @property
    def num_anchors(self) -> int:
        return self.cfg.num_anchors

    def _check_input(self, image: torch.Tensor) -> None:
        # Under ONNX tracing the shape is known and fixed; the checks only guard the dummy input
        # (and would otherwise fill the export log with TracerWarnings).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            shape = tuple(int(d) for d in image.shape)
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"image must be [B, 3, S, S], got {shape}")
        h, w = shape[2], shape[3]
        if h % 32 != 0 or w % 32 != 0:
            raise ValueError(f"image side must be divisible by 32, got {h}x{w}")
        if h != self.cfg.input_size or w != self.cfg.input_size:
            raise ValueError(
                f"image must be {self.cfg.input_size}x{self.cfg.input_size} (the anchors are laid "
                f"out for the configured input_size), got {h}x{w}"
            )

    def _sample(self, feature: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Bilinear features at `grid` ([B, G, G*n, 2] in [-1, 1]) -> [B, C, G, G*n].

        Border padding: an anchor pushed past the image edge reads the edge features instead of
        zeros, so it still gets a meaningful descriptor and gradient back towards the image.
        """
        if torch.jit.is_tracing():
            return sample_border_by_rows(feature, grid)
        return F.grid_sample(feature, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        self._check_input(image)
        cfg = self.cfg
        g, n, a = cfg.grid_size, cfg.anchors_per_cell, cfg.num_anchors
        to_unit = 2.0 / cfg.input_size

        features = self.fpn(self.backbone(image))

        anchors = self.anchor_points.unsqueeze(0).expand(image.shape[0], a, 2)
        grid = (anchors * to_unit - 1.0).reshape(-1, g, g * n, 2)
        finest = self._sample(features[0], grid)  # [B, C, G, G*n]
        finest = finest.permute(0, 2, 3, 1).reshape(-1, a, cfg.fpn_dim)
        moved = anchors + self.offset_head(finest)

        grid = (moved * to_unit - 1.0).reshape(-1, g, g * n, 2)
        descriptor = torch.cat([self._sample(f, grid) for f in features], dim=1)
        # Fuse over the anchor grid separately for each slot of the cell: [B*n, C*L, G, G].
        c = cfg.fpn_dim * cfg.fpn_levels
        descriptor = descriptor.reshape(-1, c, g, g, n).permute(0, 4, 1, 2, 3).reshape(-1, c, g, g)
        fused = self.fusion(descriptor)
        fused = fused.reshape(-1, n, cfg.head_dim, g, g).permute(0, 3, 4, 1, 2)
        fused = fused.reshape(-1, a, cfg.head_dim)

        points = moved + self.regression_head(fused)
        logits = self.classification_head(fused)
        foreground_logits = self.foreground_head(features[0])
        return {
            "points": points,
            "logits": logits,
            "foreground_logits": foreground_logits,
            "anchors": moved,
        }


def sample_border_by_rows(feature: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """F.grid_sample(feature, grid, bilinear, border padding, align_corners=False), written as four
    row gathers from a [B * H * W, C] table and their weighted sum.

    The exported graphs use it: onnxruntime's CPU GridSample computes every output value on its
    own (a quarter of the prompter's time for 4 x 64 x 1024 values), while Gather on axis 0 copies
    whole C-long rows. Equal to grid_sample up to float rounding of the weights.
    """
    # Channels, frame and grid sizes are fixed in the graph; the batch stays dynamic.
    C, H, W = (static_dim(d) for d in feature.shape[1:])
    Gh, Gw = static_dim(grid.shape[1]), static_dim(grid.shape[2])
    # Unnormalise (align_corners=False) and clamp to the border, as grid_sample's border mode does.
    x = (((grid[..., 0] + 1.0) * W - 1.0) * 0.5).clamp(0, W - 1).flatten(1)
    y = (((grid[..., 1] + 1.0) * H - 1.0) * 0.5).clamp(0, H - 1).flatten(1)
    x0, y0 = x.floor(), y.floor()
    wx, wy = (x - x0).unsqueeze(-1), (y - y0).unsqueeze(-1)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=W - 1), (y0 + 1).clamp(max=H - 1)
    table = feature.permute(0, 2, 3, 1).reshape(-1, C)
    base = (torch.arange(feature.shape[0], device=feature.device) * (H * W)).unsqueeze(1)

    def rows(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return table[base + yy * W + xx]  # [B, Gh * Gw, C]

    out = (rows(y0, x0) * (1 - wx) + rows(y0, x1) * wx) * (1 - wy) + (rows(y1, x0) * (1 - wx) + rows(y1, x1) * wx) * wy
    return out.reshape(-1, Gh, Gw, C).permute(0, 3, 1, 2)


class PrompterGraph(nn.Module):
    """The `prompter` ONNX graph of docs/architecture.md: image -> (points, logits)."""

    output_names: Tuple[str, str] = ("points", "logits")

    def __init__(self, learner: PromptLearner) -> None:
        super().__init__()
        self.learner = learner

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.learner(image)
        return out["points"], out["logits"]


@torch.no_grad()
def decode_prompts(
    points: torch.Tensor, logits: torch.Tensor, min_foreground: float = 0.0
) -> List[Dict[str, torch.Tensor]]:
    """Point prompts per image: with min_foreground = 0 the anchors whose argmax class is not
    background (paper §3.3.2); otherwise those with 1 - p(background) >= min_foreground, the rule
    the prompter service applies with the manifest's tuned threshold. Returns, per image,
    dict(points [P, 2], classes [P], scores [P] = probability of the predicted class (over all K+1),
    foreground [P] = 1 - p(background) (what the prompter ranks its point NMS by), anchor_index [P]).
    """
    probs = logits.float().softmax(-1)
    background = logits.shape[-1] - 1
    scores, classes = probs[..., :background].max(-1)
    foreground = 1.0 - probs[..., background]
    if min_foreground > 0:
        # Serving rule (the prompter service): a foreground probability threshold tuned on
        # validation, which trades precision for recall; at 0 the paper's argmax rule applies.
        keep = 1.0 - probs[..., background] >= min_foreground
    else:
        keep = probs.argmax(-1) != background
    result = []
    for b in range(points.shape[0]):
        idx = keep[b].nonzero(as_tuple=True)[0]
        result.append(
            {
                "points": points[b, idx],
                "classes": classes[b, idx],
                "scores": scores[b, idx],
                "foreground": foreground[b, idx],
                "anchor_index": idx,
            }
        )
    return result
