"""An exponential moving average of a model's weights (`--ema DECAY`), for validation and best.pt.

Validation F1 of the prompt learner moves by up to 0.04 between neighbouring epochs at a flat
training loss (docs/training/stage1-mix.log.jsonl): the weights wander around a plateau. Their
average over the last ~1/(1 - decay) steps sits nearer its middle. Training itself keeps stepping
the raw weights; the average is what validation scores and what best.pt holds, and last.pt keeps
both so a resumed run continues exactly.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator

import torch


class WeightAverage:
    """shadow <- decay * shadow + (1 - decay) * weights, after every optimiser step.

    Floating-point parameters and buffers are averaged (in float32); other buffers (counters) are
    copied as they are. Frozen parameters (stage 1 trains only the prompt learner) never change, so
    the per-step update skips them; their shadow stays what it was made from.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: Dict[str, torch.Tensor] = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        self.frozen = {name for name, p in model.named_parameters() if not p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, value in model.state_dict().items():
            if name in self.frozen:
                continue
            target = self.shadow[name]
            if value.is_floating_point():
                target.mul_(self.decay).add_(value.detach().float(), alpha=1.0 - self.decay)
            else:
                target.copy_(value)

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()})
        try:
            yield
        finally:
            model.load_state_dict(own)

    def state_dict(self) -> Dict[str, object]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        shadow = state["shadow"]
        assert isinstance(shadow, dict) and shadow.keys() == self.shadow.keys(), "EMA state of another model"
        self.shadow = {k: v.float().clone() for k, v in shadow.items()}
