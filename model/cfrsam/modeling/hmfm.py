"""Hierarchical Modulated Fusion Module (CFR-SAM §3.5).

Per level l: w_l = sigmoid(MLP(GAP(F_l))) (channel weights), F'_l = F_l + F_l * w_l, then the
levels are aggregated into one [B, D, h, w] map that goes through SAM's neck.

Aggregation (`aggregate`):
- "weighted" (default): sum_l a_l * F'_l with learned scalars a initialised to (0, ..., 0, 1), and
  the last layer of every gate MLP zero-initialised (w_l = 0.5 everywhere). The neck starts with
  a bias-free 1x1 conv followed by LayerNorm2d, which is invariant to the uniform 1.5x scale, so
  the untrained module reproduces SAM's image embedding exactly and training starts from the
  pretrained decoder's operating point; the shallow levels are blended in as a_l moves.
- "sum": the paper's plain sum of the modulated levels (a fixed to 1).
"""

import torch
import torch.nn as nn


class HMFM(nn.Module):
    def __init__(self, dim: int, num_levels: int, reduction: int = 16, aggregate: str = "weighted") -> None:
        super().__init__()
        hidden = max(dim // reduction, 4)
        self.num_levels = num_levels
        self.aggregate = aggregate
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, dim))
            for _ in range(num_levels)
        )
        for gate in self.gates:
            nn.init.zeros_(gate[2].weight)
            nn.init.zeros_(gate[2].bias)
        if aggregate == "weighted":
            init = torch.zeros(num_levels)
            init[-1] = 1.0
            self.level_weights = nn.Parameter(init)
        elif aggregate == "sum":
            self.register_parameter("level_weights", None)
        else:
            raise ValueError(f"unknown HMFM aggregate {aggregate!r}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, L, D, h, w] -> [B, D, h, w]."""
        fused = None
        for level, gate in enumerate(self.gates):
            f = features[:, level]
            w = torch.sigmoid(gate(f.mean(dim=(2, 3))))[:, :, None, None]
            f = f + f * w
            if self.level_weights is not None:
                f = f * self.level_weights[level]
            fused = f if fused is None else fused + f
        return fused
