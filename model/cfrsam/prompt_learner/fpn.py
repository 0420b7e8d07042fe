"""Feature Pyramid Network (Lin et al., 2017) over the ConvNeXt stages."""

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class FPN(nn.Module):
    """Lateral 1x1 convs, a top-down path (nearest 2x upsampling + add), 3x3 output convs.

    The top-down path always runs through every input level, so the coarse stages still inform the
    fine ones; only the `num_outs` finest levels get an output conv and are returned (the paper's
    "FPN length").
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int) -> None:
        super().__init__()
        if not 1 <= num_outs <= len(in_channels):
            raise ValueError(f"num_outs must be in 1..{len(in_channels)}, got {num_outs}")
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList([nn.Conv2d(c, out_channels, kernel_size=1) for c in in_channels])
        self.output_convs = nn.ModuleList(
            [nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1) for _ in range(num_outs)]
        )
        for conv in list(self.lateral_convs) + list(self.output_convs):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        # Every level is exactly half the size of the one below (input side divisible by 32), so
        # a fixed scale factor is exact and exports as a constant-scale Resize.
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            merged.append(lateral + F.interpolate(merged[-1], scale_factor=2.0, mode="nearest"))
        merged = merged[::-1]
        return [conv(merged[i]) for i, conv in enumerate(self.output_convs)]
