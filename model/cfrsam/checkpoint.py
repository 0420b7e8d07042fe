"""Checkpoints: official SAM checkpoints into CFR-SAM, and our own full checkpoints.

SAM layout (segment-anything's `sam_vit_{b,h}_*.pth`): a flat state dict with `image_encoder.*`,
`prompt_encoder.*`, `mask_decoder.*` (+ `pixel_mean`, `pixel_std`). Our modules use the same
names, so loading is a strict name-for-name copy, plus:
- `image_encoder.pos_embed` [1, 64, 64, D] is resized (bicubic) to the model's grid when the
  input size is not 1024;
- `...attn.rel_pos_{h,w}` [2s - 1, head_dim] are resized (linear, as segment-anything's
  get_rel_pos does at run time) to the model's window / grid;
- keys of modules SAM does not have (adapters, LoRA factors, HMFM, BGMR, prompt learner) are
  expected to be missing; any other missing key, unexpected key or shape mismatch is an error
  that lists them.

Our checkpoint: a dict {"format": "cfrsam-checkpoint/1", "config": CFRSAMConfig.to_dict(),
"model": state dict, "backbone_pretrained": bool, "training": {...} | None, "metrics": {...} | None}.
"""

import io
import os
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_FORMAT = "cfrsam-checkpoint/1"
SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
SAM_IGNORED_KEYS = ("pixel_mean", "pixel_std")

PathOrFile = Union[str, "os.PathLike[str]", io.IOBase]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (with the reasons)."""


def is_not_in_sam(name: str) -> bool:
    """Parameters CFR-SAM adds to SAM: never present in a SAM checkpoint."""
    return ".adapter." in name or ".lora_" in name or not name.startswith(SAM_PREFIXES)


# ---- resizing ---------------------------------------------------------------------------------


def resize_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """[1, H, W, D] absolute position embedding -> [1, grid_h, grid_w, D] (bicubic)."""
    if tuple(pos_embed.shape[1:3]) == tuple(grid):
        return pos_embed
    dtype = pos_embed.dtype
    x = pos_embed.float().permute(0, 3, 1, 2)
    x = F.interpolate(x, size=tuple(grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).to(dtype).contiguous()


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """[L, C] relative position table -> [length, C] (linear, as segment-anything's get_rel_pos)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    dtype = rel_pos.dtype
    x = rel_pos.float().t().unsqueeze(0)  # [1, C, L]
    x = F.interpolate(x, size=length, mode="linear", align_corners=False)
    return x.squeeze(0).t().to(dtype).contiguous()


def adapt_state_dict(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Resize the position tables of `state` to the shapes in `target` (a model's state dict)."""
    out = dict(state)
    for name, value in state.items():
        if name not in target or tuple(value.shape) == tuple(target[name].shape):
            continue
        want = target[name].shape
        if name.endswith("pos_embed") and value.dim() == 4 and value.shape[-1] == want[-1]:
            out[name] = resize_pos_embed(value, (want[1], want[2]))
        elif (
            (name.endswith("rel_pos_h") or name.endswith("rel_pos_w"))
            and value.dim() == 2
            and value.shape[1] == want[1]
        ):
            out[name] = resize_rel_pos(value, want[0])
    return out


# ---- strict loading ---------------------------------------------------------------------------


def _summarise(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_state_strict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    allow_missing=lambda name: False,
    ignore_unexpected: Iterable[str] = (),
    what: str = "checkpoint",
) -> List[str]:
    """Copy `state` into `model` after resizing position tables; raise CheckpointError listing
    missing keys (unless allowed), unexpected keys and shape mismatches. Returns the loaded keys."""
    target = model.state_dict()
    state = adapt_state_dict(state, target)
    ignored = set(ignore_unexpected)
    missing = [k for k in target if k not in state and not allow_missing(k)]
    unexpected = [k for k in state if k not in target and k not in ignored]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state
        if k in target and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_summarise(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_summarise(mismatched, 10)}")
    if problems:
        raise CheckpointError(f"{what} does not fit the model:\n  " + "\n  ".join(problems))
    loadable = {k: v for k, v in state.items() if k in target}
    with torch.no_grad():
        for name, tensor in _named_tensors(model):
            if name in loadable:
                tensor.copy_(loadable[name].to(dtype=tensor.dtype, device=tensor.device))
    return sorted(loadable)


def _named_tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _torch_load(source: PathOrFile) -> Any:
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise CheckpointError(f"checkpoint not found: {source}")
    try:
        return torch.load(source, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle errors, zip errors, truncated files...
        raise CheckpointError(f"cannot read checkpoint {source}: {exc}") from exc


def _as_state_dict(obj: Any, source: Any) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source} does not hold a state dict")
    return dict(obj)


# ---- SAM checkpoints ----------------------------------------------------------------------------


def load_sam_checkpoint(model: nn.Module, source: Union[PathOrFile, Mapping[str, torch.Tensor]]) -> List[str]:
    """Load an official SAM checkpoint (or a state dict in its layout) into a CFRSAM model."""
    obj = source if isinstance(source, Mapping) else _torch_load(source)
    state = _as_state_dict(obj, source if not isinstance(source, Mapping) else "state dict")
    if not any(k.startswith("image_encoder.") for k in state):
        raise CheckpointError(
            f"{source if not isinstance(source, Mapping) else 'state dict'} is not a SAM checkpoint "
            "(no image_encoder.* keys)"
        )
    return load_state_strict(
        model, state, allow_missing=is_not_in_sam, ignore_unexpected=SAM_IGNORED_KEYS, what="SAM checkpoint"
    )


def sam_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The SAM-layout part of a model's state dict (what an official checkpoint would hold)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not is_not_in_sam(k)}


# ---- our checkpoints ----------------------------------------------------------------------------


def save_checkpoint(
    path: PathOrFile,
    model: nn.Module,
    training: Optional[Dict[str, Any]] = None,
    metrics: Optional[Dict[str, Any]] = None,
    backbone_pretrained: Optional[bool] = None,
) -> None:
    config = model.config.to_dict()
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": config,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "backbone_pretrained": bool(
                getattr(model, "backbone_pretrained", False) if backbone_pretrained is None else backbone_pretrained
            ),
            "training": training,
            "metrics": metrics,
        },
        path,
    )


def read_checkpoint(source: PathOrFile) -> Dict[str, Any]:
    """Our checkpoint as a dict (a run's last.pt gives its weights and config; a bare state dict is
    wrapped, with config None)."""
    obj = _torch_load(source)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return dict(obj)
    if isinstance(obj, Mapping) and {"model", "config", "optimizer", "epoch"} <= obj.keys():
        # A run's resumable state (last.pt, train.common.save_training_state): its weights and
        # config are a checkpoint's, so the weights at the end of a schedule can be finalized too.
        return {
            "format": CHECKPOINT_FORMAT,
            "config": obj["config"],
            "model": obj["model"],
            "training": {"training_state": True, "epoch": obj["epoch"]},
            "metrics": None,
            "backbone_pretrained": bool(obj.get("backbone_pretrained", False)),
        }
    state = _as_state_dict(obj, source)
    if any(k.startswith("image_encoder.") for k in state) and not any(k.startswith(("hmfm.", "bgmr.")) for k in state):
        raise CheckpointError(
            f"{source} looks like an official SAM checkpoint; pass it as the SAM checkpoint "
            "(--sam-checkpoint), not as a CFR-SAM checkpoint"
        )
    return {
        "format": CHECKPOINT_FORMAT,
        "config": None,
        "model": state,
        "training": None,
        "metrics": None,
        "backbone_pretrained": False,
    }


def load_checkpoint(model: nn.Module, source: Union[PathOrFile, Mapping[str, Any]]) -> Dict[str, Any]:
    """Load our full checkpoint strictly (position tables resized); returns the checkpoint dict."""
    ckpt = dict(source) if isinstance(source, Mapping) else read_checkpoint(source)
    if "model" not in ckpt:
        ckpt = {"model": _as_state_dict(ckpt, "state dict"), "config": None}
    state = ckpt["model"]
    has_learner = getattr(model, "prompt_learner", None) is not None
    ckpt_has_learner = any(k.startswith("prompt_learner.") for k in state)
    # A convolutional stem added to a trained encoder starts at zero (ImageEncoderViT.ConvStem), so
    # a checkpoint without one loads into a model with one and computes the same.
    ckpt_has_stem = any(k.startswith("image_encoder.conv_stem.") for k in state)
    allow_prefixes = tuple(
        prefix
        for prefix, present in (("prompt_learner.", ckpt_has_learner), ("image_encoder.conv_stem.", ckpt_has_stem))
        if not present
    )

    def allow(name: str) -> bool:
        return name.startswith(allow_prefixes)  # False for an empty tuple

    if has_learner and not ckpt_has_learner:
        warnings.warn("checkpoint has no prompt learner weights; the prompt learner keeps its initial weights")
    if ckpt_has_learner and not has_learner:
        state = {k: v for k, v in state.items() if not k.startswith("prompt_learner.")}
    load_state_strict(model, state, allow_missing=allow, what="CFR-SAM checkpoint")
    model.backbone_pretrained = bool(ckpt.get("backbone_pretrained", False))
    return ckpt
