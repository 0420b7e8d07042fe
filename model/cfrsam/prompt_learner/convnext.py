"""ConvNeXt backbone (Liu et al., 2022) returning the four stage outputs (strides 4, 8, 16, 32).

Parameter names follow the reference implementation (`downsample_layers`, `stages`, `dwconv`,
`pwconv1`, `pwconv2`, `gamma`), so ImageNet checkpoints of facebookresearch/ConvNeXt load with
`load_state_dict(..., strict=False)` (the classifier head and final norm are simply absent).
"""

from typing import List, Sequence

import torch
import torch.nn as nn

from ..modeling.common import LayerNorm2d


class DropPath(nn.Module):
    """Stochastic depth per sample; the identity at inference."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> 4x MLP with GELU -> layer scale -> drop path + residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init * torch.ones(dim)) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class ConvNeXt(nn.Module):
    """Stem (4x4 stride 4 + LN) and four stages separated by LN + 2x2 stride-2 convs."""

    def __init__(
        self,
        in_chans: int = 3,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (3, 3, 27, 3),
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-6,
    ) -> None:
        super().__init__()
        self.dims = tuple(dims)
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
            )
        # Drop-path rate grows linearly with depth, as in the reference.
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        start = 0
        for dim, depth in zip(dims, depths):
            self.stages.append(
                nn.Sequential(*[ConvNeXtBlock(dim, rates[start + j], layer_scale_init) for j in range(depth)])
            )
            start += depth
        # Each stage output is normalised before it leaves the backbone (as in ConvNeXt's
        # detection/segmentation variants), which keeps FPN inputs on one scale.
        self.out_norms = nn.ModuleList([LayerNorm2d(dim) for dim in dims])
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = []
        for downsample, stage, norm in zip(self.downsample_layers, self.stages, self.out_norms):
            x = stage(downsample(x))
            features.append(norm(x))
        return features
