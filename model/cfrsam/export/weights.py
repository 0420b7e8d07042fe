"""Bundle weights: float16 rounding, the stored state dict and its content hash."""

import hashlib
import json
from typing import Any, Dict

import torch
import torch.nn as nn


def round_to_fp16(model: nn.Module) -> None:
    """Round every float parameter and buffer to float16 precision (kept as float32)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype == torch.float32:
                t.copy_(t.half().float())


def bundle_state_dict(model: nn.Module, precision: str) -> Dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if precision == "fp16":
        sd = {k: v.half() if v.dtype == torch.float32 else v for k, v in sd.items()}
    return sd


def state_dict_sha256(state: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, little-endian bytes) of every tensor, by sorted name."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        arr = t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
        h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def model_sha256(weights_sha: str, config: Dict[str, Any], prompter: Dict[str, Any]) -> str:
    """SHA-256 of what the bundle serves: the weights, the config that shapes the graphs and the
    prompter's decision settings (foreground threshold, NMS radius).

    Two exports of the same weights with, say, another refinement window give other masks, and with
    another threshold other nuclei, so they must not share a version (result caches and feature
    tiers are keyed by it).
    """
    text = weights_sha + json.dumps(config, sort_keys=True) + json.dumps(prompter, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
