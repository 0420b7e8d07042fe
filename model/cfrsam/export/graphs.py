"""The stage graphs of the ONNX contract: names, dynamic axes and the nn.Module wrappers traced."""

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..modeling.cfr_sam import CFRSAM
from ..prompt_learner import PointRefinerGraph, PrompterGraph

OPSET = 17

GRAPH_FILES = {
    "prompter": "prompter.onnx",
    "encoder": "encoder.onnx",
    "decoder_image": "decoder_image.onnx",
    "decoder_prompts": "decoder_prompts.onnx",
    "decoder_prompts_full": "decoder_prompts_full.onnx",
    "point_refiner": "point_refiner.onnx",
}
# Graphs a bundle has only when its model has the part: the point refiner.
OPTIONAL_GRAPHS = ("point_refiner",)
GRAPH_IO = {
    "prompter": (["image"], ["points", "logits"]),
    "encoder": (["image"], ["features"]),
    "decoder_image": (["features", "image"], ["image_embedding", "semantic", "boundary_features"]),
    "decoder_prompts": (
        ["image_embedding", "semantic", "boundary_features", "point_coords", "point_labels"],
        ["mask_logits", "window_origin", "iou_predictions", "coarse_logits", "boundary_logits"],
    ),
}
GRAPH_IO["decoder_prompts_full"] = GRAPH_IO["decoder_prompts"]
GRAPH_IO["point_refiner"] = (
    ["image", "points", "image_index"],
    ["refined_points", "point_scores", "point_class_probs"],
)
DYNAMIC_AXES = {
    "prompter": {"image": {0: "B"}, "points": {0: "B"}, "logits": {0: "B"}},
    "encoder": {"image": {0: "B"}, "features": {0: "B"}},
    "decoder_image": {},
    "decoder_prompts": {
        "point_coords": {0: "P", 1: "N"},
        "point_labels": {0: "P", 1: "N"},
        "mask_logits": {0: "P"},
        "window_origin": {0: "P"},
        "iou_predictions": {0: "P"},
        "coarse_logits": {0: "P"},
        "boundary_logits": {0: "P"},
    },
}
DYNAMIC_AXES["decoder_prompts_full"] = DYNAMIC_AXES["decoder_prompts"]
DYNAMIC_AXES["point_refiner"] = {
    "image": {0: "B"},
    "points": {0: "P"},
    "image_index": {0: "P"},
    "refined_points": {0: "P"},
    "point_scores": {0: "P"},
    "point_class_probs": {0: "P"},
}


class EncoderGraph(nn.Module):
    def __init__(self, model: CFRSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode(image)


class DecoderImageGraph(nn.Module):
    def __init__(self, model: CFRSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, image: torch.Tensor):
        return self.model.prepare(features, image)


class DecoderPromptsGraph(nn.Module):
    def __init__(self, model: CFRSAM, refinement: str) -> None:
        super().__init__()
        self.model = model
        self.refinement = refinement

    def forward(self, image_embedding, semantic, boundary_features, point_coords, point_labels):
        return self.model.decode_prompts(
            image_embedding, semantic, boundary_features, point_coords, point_labels, refinement=self.refinement
        )


def stage_module(model: CFRSAM, graph: str) -> nn.Module:
    if graph == "prompter":
        return PrompterGraph(model.prompt_learner)
    if graph == "encoder":
        return EncoderGraph(model)
    if graph == "decoder_image":
        return DecoderImageGraph(model)
    if graph == "decoder_prompts":
        return DecoderPromptsGraph(model, model.config.bgmr.refinement)
    if graph == "decoder_prompts_full":
        return DecoderPromptsGraph(model, "full")
    if graph == "point_refiner":
        if model.point_refiner is None:
            raise KeyError("point_refiner: the model has no point refiner")
        return PointRefinerGraph(model.point_refiner)
    raise KeyError(graph)


def run_stage(model: CFRSAM, graph: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """PyTorch outputs of one stage graph for numpy inputs (by the contract's names)."""
    module = stage_module(model, graph).eval()
    names_in, names_out = GRAPH_IO[graph]
    with torch.no_grad():
        out = module(*[torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names_in])
    if isinstance(out, torch.Tensor):
        out = (out,)
    return {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names_out, out)}


def example_args(inputs: Dict[str, np.ndarray], graph: str) -> Tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in GRAPH_IO[graph][0])
