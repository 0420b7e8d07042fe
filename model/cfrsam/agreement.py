"""Window vs full-frame BGMR refinement: how well they agree inside the window.

    python -m cfrsam.agreement [--config tiny] [--checkpoint PT] [--sam-checkpoint PTH]
        [--input-size N] [--window W] [--images 2] [--seed 0] [--json]

Prompts are single positive points on the nuclei of seeded synthetic H&E tiles (or pass a trained
checkpoint for meaningful masks). Reports, over all prompts, the mean absolute difference of the
mask probabilities inside the window, the mean / minimum IoU of the thresholded masks, and the
same restricted to the window's interior beyond BGMR's exact margin (where the two must agree).
"""

import argparse
import json
import sys
from typing import Dict, List, Optional

import torch

from .build import build_cfr_sam
from .checkpoint import CheckpointError, read_checkpoint
from .configs import ConfigError
from .modeling.cfr_sam import refinement_agreement
from .synthetic import normalise, synthetic_he_image


def _samples(model, images: int, seed: int, data: Optional[str]):
    """(image [1,3,S,S], centres [n,2]) pairs: real tiles with their ground-truth centroids when
    `data` is a set directory (centre crops of its first images), else synthetic tiles."""
    cfg = model.config
    if data:
        from .data import NucleiDataset  # noqa: WPS433 (only this mode needs the loader)

        dataset = NucleiDataset(data, size=cfg.input_size, crop="center")
        for i in range(min(images, len(dataset))):
            item = dataset[i]
            if len(item["centroids"]):
                yield item["image"][None], item["centroids"].numpy()
        return
    for i in range(images):
        rgb, centres = synthetic_he_image(cfg.input_size, seed=seed + i)
        yield torch.from_numpy(normalise(rgb, cfg.pixel_mean, cfg.pixel_std)), centres


def measure(model, images: int = 2, seed: int = 0, data: Optional[str] = None) -> Dict[str, float]:
    totals: Dict[str, List[float]] = {}
    weights: List[int] = []
    for image, centres in _samples(model, images, seed, data):
        coords = torch.from_numpy(centres).unsqueeze(1)
        labels = torch.ones(coords.shape[0], 1)
        result = refinement_agreement(model, image, coords, labels)
        weights.append(coords.shape[0])
        for key, value in result.items():
            totals.setdefault(key, []).append(float(value))
    n = sum(weights)
    out = {}
    for key, values in totals.items():
        if key.endswith("min_iou"):
            out[key] = min(values)
        elif key in ("window", "margin"):
            out[key] = values[0]
        elif key == "prompts":
            out[key] = n
        else:
            out[key] = sum(v * w for v, w in zip(values, weights)) / n
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cfrsam.agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--checkpoint")
    p.add_argument("--sam-checkpoint")
    p.add_argument("--input-size", type=int)
    p.add_argument("--window", type=int)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--data", help="a set directory (../shared/data layout): real tiles, ground-truth centroid prompts")
    args = p.parse_args(argv)
    try:
        ckpt = read_checkpoint(args.checkpoint) if args.checkpoint else None
        model = build_cfr_sam(
            args.config or (None if ckpt else "tiny"),
            checkpoint=ckpt,
            sam_checkpoint=args.sam_checkpoint,
            seed=args.seed,
            input_size=args.input_size,
            window=args.window,
            with_prompt_learner=False,
        )
    except (ConfigError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with torch.no_grad():
        result = measure(model, args.images, args.seed, args.data)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"window {result['window']} px, exact margin {result['margin']} px, {result['prompts']} prompts")
        print(
            f"  whole window : mean |dp| {result['mean_abs_prob_diff']:.2e}, IoU mean {result['mean_iou']:.4f}"
            f" min {result['min_iou']:.4f}"
        )
        print(
            f"  interior     : mean |dp| {result['interior_mean_abs_prob_diff']:.2e}, IoU mean "
            f"{result['interior_mean_iou']:.4f} min {result['interior_min_iou']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
