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

    def __post_init__(self) -> None:
        if self.crop % 4 != 0 or self.crop < 16:
            raise ValueError(f"crop must be a multiple of 4 and >= 16, got {self.crop}")

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
        half = cfg.crop // 2
        # Heat-map cell centres (stride 2) relative to the crop's centre, in input pixels.
        steps = torch.arange(half, dtype=torch.float32) * 2.0 + 1.0 - half
        self.register_buffer("cell_x", steps.view(1, 1, half).expand(1, half, half).reshape(1, -1).clone())
        self.register_buffer("cell_y", steps.view(1, half, 1).expand(1, half, half).reshape(1, -1).clone())

    def heat_logits(self, crops: torch.Tensor) -> torch.Tensor:
        """[P, (C/2)^2] logits over the stride-2 cells of each crop (row-major)."""
        return self.head(self.context(self.down(self.stem(crops)))).flatten(1).float()

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
        half = self.cfg.crop // 2
        padded = F.pad(image, (half, half, half, half))
        origins = self.crop_origins(points, image.shape[-1])
        return crop_windows(padded, origins, self.cfg.crop, image_index=image_index.long())

    def refine(
        self, image: torch.Tensor, points: torch.Tensor, image_index: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Refined points [P, 2] for points [P, 2] on image [N, 3, S, S] (image_index [P], default
        0), inside the frame [0, S]."""
        if image_index is None:
            image_index = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
        size = image.shape[-1]
        centres = self.crop_origins(points, size).to(points.dtype)
        return (centres + self(self.crops(image, points, image_index)).to(points.dtype)).clamp(0, size)


class PointRefinerGraph(nn.Module):
    """The `point_refiner` ONNX graph: (image [B,3,S,S], points [P,2], image_index [P] int64) ->
    refined_points [P,2]. The prompter service runs it on the points its NMS kept."""

    output_names: Tuple[str] = ("refined_points",)

    def __init__(self, refiner: PointRefiner) -> None:
        super().__init__()
        self.refiner = refiner

    def forward(self, image: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        return self.refiner.refine(image, points, image_index)
