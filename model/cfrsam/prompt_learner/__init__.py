"""Stage 1 of CFR-SAM: the prompt learner that turns an image into classified point prompts."""

from .config import PRESET_NAMES, PromptLearnerConfig, prompt_learner_config
from .convnext import ConvNeXt
from .fpn import FPN
from .loss import PromptLearnerLoss, sigmoid_focal_loss
from .matcher import HungarianMatcher, match_anchors
from .point_refiner import PointRefiner, PointRefinerConfig, PointRefinerGraph
from .prompt_learner import PromptLearner, PrompterGraph, decode_prompts, uniform_anchor_grid

__all__ = [
    "PRESET_NAMES",
    "PromptLearnerConfig",
    "prompt_learner_config",
    "ConvNeXt",
    "FPN",
    "PromptLearner",
    "PrompterGraph",
    "PointRefiner",
    "PointRefinerConfig",
    "PointRefinerGraph",
    "decode_prompts",
    "uniform_anchor_grid",
    "HungarianMatcher",
    "match_anchors",
    "PromptLearnerLoss",
    "sigmoid_focal_loss",
]
