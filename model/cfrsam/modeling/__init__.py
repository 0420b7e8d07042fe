"""CFR-SAM modules, one per component (segment-anything layout)."""

from .bgmr import BGMR
from .cfr_sam import CFRSAM, refinement_agreement, window_origins
from .hmfm import HMFM
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .peft import MALA, BottleneckAdapter, LoRAQKV, configure_trainable, inject_peft
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer

__all__ = [
    "BGMR",
    "CFRSAM",
    "HMFM",
    "ImageEncoderViT",
    "MaskDecoder",
    "MALA",
    "BottleneckAdapter",
    "LoRAQKV",
    "PromptEncoder",
    "TwoWayTransformer",
    "configure_trainable",
    "inject_peft",
    "refinement_agreement",
    "window_origins",
]
