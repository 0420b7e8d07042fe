"""manifest.json: the bundle's description (docs/architecture.md), built from the model and its provenance."""

import datetime
import os
from typing import Any, Dict, Optional

import torch

from ..modeling.cfr_sam import CFRSAM
from .graphs import OPSET

BUNDLE_FORMAT = "cfrsam-bundle/1"
# Prompt selection defaults the services apply to the prompter's output (not part of the graph).
PROMPTER_MIN_FOREGROUND = 0.5
PROMPTER_NMS_RADIUS = 4


def prompter_settings(checkpoint_info: Dict[str, Any]) -> Dict[str, float]:
    """The prompter's decision settings: tuned on validation when training recorded them
    (cfrsam.train.finalize), else the defaults. They change which nuclei are found, so the
    bundle's version hashes them too."""
    recorded = checkpoint_info.get("prompter") or {}
    return {
        "min_foreground": float(recorded.get("min_foreground", PROMPTER_MIN_FOREGROUND)),
        "nms_radius": float(recorded.get("nms_radius", PROMPTER_NMS_RADIUS)),
    }


def refiner_settings(cfg) -> Dict[str, Any]:
    """The point refiner's serving settings in the manifest's `prompter` (the services apply them)."""
    settings = {
        "refined_nms_radius": cfg.nms_radius,
        "min_point_score": cfg.min_score,
        "refiner_class_weight": cfg.class_weight,
    }
    if cfg.blur_gate > 0:
        settings["blur_gate"] = {"sharpness_below": cfg.blur_gate, "min_point_score": cfg.blurred_min_score}
    return settings


def build_manifest(
    model: CFRSAM,
    name: Optional[str],
    version: str,
    weights_sha: str,
    seed: int,
    precision: str,
    graph_entries: Dict[str, Any],
    checkpoint_info: Dict[str, Any],
    source: Dict[str, Any],
) -> Dict[str, Any]:
    cfg = model.config
    size = cfg.input_size
    learner_cfg = model.prompt_learner.cfg
    window = cfg.refinement_window()
    prepared_shapes = {
        "image_embedding": [1, cfg.image_encoder.out_chans, cfg.grid_size, cfg.grid_size],
        "semantic": [1, model.bgmr.semantic_dim, size // 4, size // 4],
        "boundary_features": [1, model.bgmr.boundary_dim, size, size],
    }
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
        if epoch
        else datetime.datetime.now(datetime.timezone.utc)
    )
    return {
        "format": BUNDLE_FORMAT,
        "name": name or f"cfrsam-{cfg.name}",
        "version": version,
        "config": cfg.name,
        "input_size": size,
        "patch_size": cfg.image_encoder.patch_size,
        "normalization": {"mean": list(cfg.pixel_mean), "std": list(cfg.pixel_std)},
        "classes": [{"name": n, "color": c} for n, c in zip(cfg.class_names, cfg.class_colors)],
        "mpp": cfg.mpp,
        "hmfm_levels": list(cfg.hmfm.levels),
        "feature_shape": cfg.feature_shape(),
        "prepared_shapes": prepared_shapes,
        "refinement": {
            "mode": cfg.bgmr.refinement,
            "window": window,
            "exact_margin": min(model.bgmr.window_margin(), window // 2),
        },
        "mask_threshold": cfg.mask_threshold,
        "prompter": {
            "anchors": learner_cfg.num_anchors,
            **prompter_settings(checkpoint_info),
            **(refiner_settings(model.point_refiner.cfg) if getattr(model, "point_refiner", None) is not None else {}),
        },
        "graphs": graph_entries,
        "provenance": {
            "config": cfg.to_dict(),
            "weights_sha256": weights_sha,
            "weights_precision": precision,
            "seed": seed,
            "torch": torch.__version__.split("+")[0],
            "onnx_opset": OPSET,
            "exported_at": now.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "backbone_pretrained": bool(getattr(model, "backbone_pretrained", False)),
            "source": source,
            "training": checkpoint_info.get("training"),
        },
        "metrics": checkpoint_info.get("metrics") or {},
    }


# ---- check ------------------------------------------------------------------------------------
