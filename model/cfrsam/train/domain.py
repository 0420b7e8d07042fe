"""Domain-adversarial training of the prompt learner (AMA-SAM's multi-dataset alignment, as DANN).

The training sets come from different labs, scanners and stains (CoNSeP, MoNuSeg, CPM-15, NuCLS).
A small classifier tries to tell from the prompt learner's deepest backbone features which set an
image came from; a gradient-reversal layer between them makes the backbone work against it, so the
features the detection heads read carry less of what tells the sources apart. The classifier is a
training aid only: it is not part of the model, its checkpoint or the exported graphs.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
from torch import nn


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coefficient * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Identity forward; the gradient multiplied by -coefficient backward."""
    return _ReverseGradient.apply(x, coefficient)


def reversal_schedule(progress: float) -> float:
    """Ganin and Lempitsky's ramp from 0 to 1 over training (progress in [0, 1]): the adversary's
    pull is weak while the features are still forming."""
    return 2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0


class DomainClassifier(nn.Module):
    """Global average pool -> MLP -> one logit per source set."""

    def __init__(self, channels: int, domains: int, hidden: int = 64) -> None:
        super().__init__()
        if domains < 2:
            raise ValueError(f"domain-adversarial training needs at least 2 source sets, got {domains}")
        self.head = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, domains))

    def forward(self, features: torch.Tensor, coefficient: float) -> torch.Tensor:
        pooled = features.float().mean(dim=(2, 3))
        return self.head(reverse_gradient(pooled, coefficient))


def domains_by_name(parts: Sequence) -> Dict[str, int]:
    """{sample name: index of its set} over the training sets (ConcatDataset parts, in order)."""
    domains: Dict[str, int] = {}
    for index, part in enumerate(parts):
        for name in part.names:
            if domains.setdefault(name, index) != index:
                raise ValueError(f"sample name {name!r} is in two training sets; domains need unique names")
    return domains
