"""Configuration of the stage-1 prompt learner, as data.

Defaults follow the paper (CFR-SAM §3.3, §4.3) and the public PromptNucSeg prompter that CFR-SAM's
prompt learner is built on: ConvNeXt-S + FPN with 256 channels, dropout 0.1, hidden dim 256, an
anchor every 8 px (PanNuke) or 16 px (CPM-17, MoNuSeg), 3 FPN levels sampled (PanNuke) or 4.
"""

from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple


@dataclass(frozen=True)
class PromptLearnerConfig:
    """Everything that fixes the prompt learner's architecture.

    num_classes is K, the number of nucleus classes; the classifier predicts K + 1 logits and the
    background class is index K (the last).
    """

    num_classes: int = 1
    input_size: int = 256
    # ConvNeXt backbone: four stages at strides 4, 8, 16, 32.
    backbone_dims: Tuple[int, int, int, int] = (96, 192, 384, 768)
    backbone_depths: Tuple[int, int, int, int] = (3, 3, 27, 3)
    drop_path: float = 0.1
    layer_scale_init: float = 1e-6
    # FPN: the top-down path always uses all four stages; features are sampled from the
    # `fpn_levels` finest outputs (strides 4, 8, ... 2 ** (fpn_levels + 1)). The paper calls this
    # the "FPN length" (3 for PanNuke, 4 for CPM-17 and MoNuSeg).
    fpn_dim: int = 256
    fpn_levels: int = 3
    # Anchors: a uniform grid with one cell every `anchor_stride` input pixels and
    # `anchors_per_cell` anchors in each cell. A = (S / stride) ** 2 * anchors_per_cell.
    anchor_stride: int = 8
    anchors_per_cell: int = 1
    learnable_anchors: bool = True
    # Heads.
    head_dim: int = 256
    dropout: float = 0.1
    # Kernel of the conv that fuses the concatenated multi-level descriptor over the anchor grid
    # (PromptNucSeg uses 3: neighbouring anchors see each other, which helps them not to collapse
    # on the same nucleus). 1 makes it a per-anchor linear layer.
    fusion_kernel: int = 3
    # Auxiliary foreground head on the finest FPN level.
    mask_dim: int = 64

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.backbone_dims) != 4 or len(self.backbone_depths) != 4:
            raise ValueError("backbone_dims and backbone_depths need exactly 4 stages")
        if not 1 <= self.fpn_levels <= 4:
            raise ValueError(f"fpn_levels must be in 1..4, got {self.fpn_levels}")
        if self.input_size % 32 != 0:
            raise ValueError(f"input_size must be divisible by 32, got {self.input_size}")
        if self.anchor_stride < 1 or self.input_size % self.anchor_stride != 0:
            raise ValueError(f"anchor_stride must divide input_size ({self.input_size}), got {self.anchor_stride}")
        if self.anchors_per_cell < 1:
            raise ValueError(f"anchors_per_cell must be >= 1, got {self.anchors_per_cell}")
        if self.fusion_kernel % 2 != 1:
            raise ValueError(f"fusion_kernel must be odd, got {self.fusion_kernel}")

    @property
    def grid_size(self) -> int:
        return self.input_size // self.anchor_stride

    @property
    def num_anchors(self) -> int:
        return self.grid_size * self.grid_size * self.anchors_per_cell

    @property
    def background_index(self) -> int:
        return self.num_classes

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "PromptLearnerConfig":
        values = dict(values)
        for key in ("backbone_dims", "backbone_depths"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


_PRESETS: Dict[str, Dict[str, Any]] = {
    # CPU default for tests, CI and the committed tiny bundle.
    "femto": dict(
        backbone_dims=(24, 48, 96, 192),
        backbone_depths=(2, 2, 2, 2),
        drop_path=0.0,
        fpn_dim=64,
        head_dim=64,
        mask_dim=32,
    ),
    "nano": dict(
        backbone_dims=(48, 96, 192, 384),
        backbone_depths=(2, 2, 6, 2),
        drop_path=0.05,
        fpn_dim=128,
        head_dim=128,
        mask_dim=64,
    ),
    # ConvNeXt-T.
    "tiny": dict(
        backbone_dims=(96, 192, 384, 768),
        backbone_depths=(3, 3, 9, 3),
        drop_path=0.1,
        fpn_dim=256,
        head_dim=256,
        mask_dim=64,
    ),
    # ConvNeXt-S, the paper's backbone.
    "small": dict(
        backbone_dims=(96, 192, 384, 768),
        backbone_depths=(3, 3, 27, 3),
        drop_path=0.2,
        fpn_dim=256,
        head_dim=256,
        mask_dim=64,
    ),
}

PRESET_NAMES: Tuple[str, ...] = tuple(_PRESETS)


def prompt_learner_config(name: str, num_classes: int = 1, **overrides: Any) -> PromptLearnerConfig:
    """The named preset with `num_classes` nucleus classes; keyword overrides replace fields."""
    if name not in _PRESETS:
        raise ValueError(f"unknown prompt learner preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    values = dict(_PRESETS[name], num_classes=num_classes)
    values.update(overrides)
    return PromptLearnerConfig.from_dict(values)
