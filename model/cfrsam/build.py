"""build_cfr_sam: config (+ overrides) -> model, optionally with SAM and/or CFR-SAM weights."""

import os
from typing import Any, Union

import torch

from .checkpoint import CheckpointError, load_checkpoint, load_sam_checkpoint, read_checkpoint
from .configs import CFRSAMConfig, make_config
from .modeling.cfr_sam import CFRSAM
from .modeling.peft import configure_trainable


def build_cfr_sam(
    config_name_or_config: Union[str, CFRSAMConfig, dict, None] = None,
    checkpoint: Union[str, "os.PathLike[str]", dict, None] = None,
    sam_checkpoint: Union[str, "os.PathLike[str]", dict, None] = None,
    seed: int = 0,
    with_prompt_learner: bool = True,
    **overrides: Any,
) -> CFRSAM:
    """Build CFR-SAM in eval mode with the freezing rules applied.

    config_name_or_config: a preset name ("tiny", "b", "h"), a config dict or CFRSAMConfig; may be
    None when `checkpoint` is one of ours (its recorded config is used). Overrides as in
    CFRSAMConfig.replace (e.g. input_size=512, peft_mode="lora", image_encoder__depth=2).
    sam_checkpoint: official SAM weights (path or state dict) for image encoder, prompt encoder and
    mask decoder; the backbone is then frozen except for its adapters.
    checkpoint: a CFR-SAM checkpoint (ours), loaded last.
    Parameters not covered by a checkpoint are initialised from `seed`.
    """
    ckpt = None
    if checkpoint is not None:
        ckpt = (
            checkpoint
            if isinstance(checkpoint, dict) and "model" in checkpoint
            else (read_checkpoint(checkpoint) if not isinstance(checkpoint, dict) else {"model": checkpoint})
        )
    if config_name_or_config is None:
        if ckpt is None or not ckpt.get("config"):
            raise ValueError("no config given and the checkpoint does not record one")
        config_name_or_config = ckpt["config"]
    cfg = make_config(config_name_or_config, **overrides)

    torch.manual_seed(seed)
    model = CFRSAM.from_config(cfg, with_prompt_learner=with_prompt_learner)
    backbone_pretrained = False
    if sam_checkpoint is not None:
        load_sam_checkpoint(model, sam_checkpoint)
        backbone_pretrained = True
    if ckpt is not None:
        load_checkpoint(model, ckpt)
        backbone_pretrained = backbone_pretrained or bool(ckpt.get("backbone_pretrained", False))
    model.backbone_pretrained = backbone_pretrained
    configure_trainable(model, backbone_pretrained)
    return model.eval()


__all__ = ["build_cfr_sam", "CheckpointError"]
