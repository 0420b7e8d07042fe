"""Train the point refiner (`prompt_learner/point_refiner.py`), measure what it gives, attach it.

    python -m cfrsam.train.refiner --checkpoint ../runs/final.pt --out ../runs/refiner \
        [--steps 3000] [--write-checkpoint ../runs/final-refined.pt]
    python -m cfrsam.train.refiner --checkpoint ../runs/final.pt --out ../runs/refiner \
        --refiner ../runs/refiner/refiner.pt --write-checkpoint ../runs/final-refined.pt   # no training

The refiner learns from the ground truth alone (not from the prompt learner), so one trained
refiner can be attached to any model of the same input size and resolution.

Training samples: ground-truth centroids of the training tiles (the stage-1 sets and augmentation)
moved by Gaussian noise of a random std up to --jitter px per axis, as the prompter's points sit;
the target is the centroid of the nucleus under the moved point (the one it was drawn from when
it lands on none). Loss: the Euclidean distance in pixels.

Validation (every --val-every steps and at the end), on the held-out CoNSeP tiles with the
checkpoint's prompter at the served setting: the prompter's points paired with a nucleus, their
offset from its centroid before and after refinement; at the end also bPQ / AJI / detection F1 of
the whole pipeline (PyTorch, the serving rules) with the points as served and refined.
`--write-checkpoint` writes the checkpoint with the refiner attached (its config gains
`point_refiner`; the export then writes point_refiner.onnx, which the prompter service runs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..build import build_cfr_sam
from ..inference import detect_points, segment_tile
from ..metrics import MetricAccumulator, pair_points
from ..prompt_learner.point_refiner import PointRefiner, PointRefinerConfig
from . import common
from .stage2 import validate as validate_pipeline


def training_batch(batch, per_image: int, jitter: float, rng: np.random.Generator):
    """(points [P, 2], image_index [P], targets [P, 2]) drawn from a collated batch."""
    points, index, targets = [], [], []
    size = batch["image"].shape[-1]
    for b, centroids in enumerate(batch["centroids"]):
        centroids = centroids.numpy().reshape(-1, 2)
        if len(centroids) == 0:
            continue
        chosen = rng.choice(len(centroids), size=min(per_image, len(centroids)), replace=False)
        sigma = rng.uniform(0, jitter, size=(len(chosen), 1))
        moved = np.clip(centroids[chosen] + rng.normal(0, 1, (len(chosen), 2)) * sigma, 0, size - 1e-3)
        under = batch["instances"][b].numpy()[moved[:, 1].astype(int), moved[:, 0].astype(int)]
        target = np.where((under > 0)[:, None], centroids[np.maximum(under - 1, 0)], centroids[chosen])
        points.append(moved)
        targets.append(target)
        index.append(np.full(len(chosen), b))

    def cat(xs, dtype):
        return torch.from_numpy(np.concatenate(xs)).to(dtype) if xs else torch.zeros((0,), dtype=dtype)

    return cat(points, torch.float32), cat(index, torch.long), cat(targets, torch.float32)


@torch.no_grad()
def prompter_batch(model, batch, min_foreground: float, nms_radius: float, radius: float):
    """The prompt learner's own kept points on a collated batch, each with the centroid of the
    nucleus under it, else of the nearest one within `radius` px (points near no nucleus are left
    out): (points [P, 2], image_index [P], targets [P, 2])."""
    points, index, targets = [], [], []
    for b, centroids in enumerate(batch["centroids"]):
        centroids = centroids.numpy().reshape(-1, 2)
        if len(centroids) == 0:
            continue
        pts = detect_points(model, batch["image"][b : b + 1], min_foreground, nms_radius)[0]
        if len(pts) == 0:
            continue
        size = batch["image"].shape[-1]
        cells = np.clip(pts, 0, size - 1e-3).astype(int)
        under = batch["instances"][b].numpy()[cells[:, 1], cells[:, 0]]
        distance = np.linalg.norm(pts[:, None, :] - centroids[None, :, :], axis=-1)
        nearest = distance.argmin(1)
        target_index = np.where(under > 0, under - 1, nearest)
        keep = (under > 0) | (distance[np.arange(len(pts)), nearest] <= radius)
        points.append(pts[keep])
        targets.append(centroids[target_index[keep]])
        index.append(np.full(int(keep.sum()), b))
    if not points:
        return torch.zeros((0, 2)), torch.zeros((0,), dtype=torch.long), torch.zeros((0, 2))
    return (
        torch.from_numpy(np.concatenate(points)).float(),
        torch.from_numpy(np.concatenate(index)).long(),
        torch.from_numpy(np.concatenate(targets)).float(),
    )


@torch.no_grad()
def served_points(model, val_set, min_foreground: float, nms_radius: float):
    """Per validation tile: (image, gt instances, centroids, points, classes)."""
    tiles = []
    for i in range(len(val_set)):
        item = val_set[i]
        image = item["image"][None]
        pts, classes, _, foreground = detect_points(model, image, min_foreground, nms_radius)
        tiles.append(
            (image, item["instances"].numpy(), item["centroids"].numpy().reshape(-1, 2), pts, classes, foreground)
        )
    return tiles


@torch.no_grad()
def refine_points(refiner: PointRefiner, image: torch.Tensor, points: np.ndarray) -> np.ndarray:
    if len(points) == 0:
        return points
    out = refiner.refine(image, torch.from_numpy(points).float())
    return np.clip(out.numpy(), 0, image.shape[-1] - 1e-3)


def placement(tiles, refiner, radius: float):
    """Offsets (px) of the points paired with a nucleus, as served and refined."""
    before, after = [], []
    for image, _, centroids, pts, _, _ in tiles:
        if len(pts) == 0 or len(centroids) == 0:
            continue
        pairs = pair_points(pts, centroids, radius)
        refined = refine_points(refiner, image, pts)
        before.extend(np.linalg.norm(pts[pairs[:, 0]] - centroids[pairs[:, 1]], axis=1))
        after.extend(np.linalg.norm(refined[pairs[:, 0]] - centroids[pairs[:, 1]], axis=1))

    def stats(d):
        return {"mean": float(np.mean(d)), "median": float(np.median(d)), "p90": float(np.percentile(d, 90))}

    return stats(before), stats(after)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_analysis_args(parser)
    parser.add_argument("--out", required=True, help="run directory (log.jsonl, refiner.pt)")
    parser.add_argument("--refiner", help="a trained refiner.pt: skip training")
    parser.add_argument("--write-checkpoint", help="write --checkpoint with the refiner attached here")
    parser.add_argument("--sets", default="consep-train," + ",".join(common.EXTRA_SETS))
    parser.add_argument("--repeat", default="monuseg-train=6,cpm15=2")
    parser.add_argument("--hold-out", default="monuseg-train=3")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per step")
    parser.add_argument("--per-image", type=int, default=24, help="nuclei drawn per tile per step")
    parser.add_argument("--jitter", type=float, default=6.0, help="largest std (px per axis) of the noise")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--crop", type=int, default=PointRefinerConfig.crop)
    parser.add_argument("--width", type=int, default=PointRefinerConfig.width)
    parser.add_argument("--stem-width", type=int, default=PointRefinerConfig.stem_width)
    parser.add_argument("--dilations", default=",".join(map(str, PointRefinerConfig.dilations)))
    parser.add_argument("--heat-sigma", type=float, default=1.5, help="std (px) of the target heat map")
    parser.add_argument("--distance-weight", type=float, default=0.1, help="weight of the distance loss (px)")
    parser.add_argument("--val-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the final bPQ comparison")
    parser.add_argument(
        "--prompter-points",
        action="store_true",
        help="also train on the checkpoint's own kept points of each training crop (at the served setting)",
    )
    return parser.parse_args(argv)


def train(args, refiner: PointRefiner, train_set, tiles, log: common.RunLog, out: Path, model=None) -> None:
    """Trains `refiner` in place for args.steps steps; validates and saves refiner.pt on the way.
    With `model` (and args.prompter_points), each step also trains on the model's own kept points."""
    from ..data.dataset import collate_nuclei

    size = train_set[0]["image"].shape[-1]
    loader = common.make_loader(train_set, args.batch_size, True, 0, args.seed, collate_nuclei)
    optimiser = torch.optim.AdamW(refiner.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    rng = np.random.default_rng(args.seed)
    step, began, distances = 0, time.time(), []
    while step < args.steps:
        for batch in loader:
            refiner.train()
            points, index, targets = training_batch(batch, args.per_image, args.jitter, rng)
            if model is not None and getattr(args, "prompter_points", False):
                more = prompter_batch(model, batch, args.min_foreground, args.nms_radius, args.radius)
                points, index, targets = (torch.cat(pair) for pair in zip((points, index, targets), more))
            if len(points) == 0:  # no nucleus in any of the batch's crops
                continue
            offsets = targets - refiner.crop_origins(points, size).float()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = refiner.heat_logits(refiner.crops(batch["image"], points, index))
            # A heat-map loss (cross-entropy against a Gaussian at the target) trains the map fast;
            # the distance of its expectation is what serving uses.
            distance = (refiner.expectation(logits) - offsets).norm(dim=-1).mean()
            heat = -(refiner.target_distribution(offsets, args.heat_sigma) * logits.log_softmax(-1)).sum(-1).mean()
            loss = heat + args.distance_weight * distance
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            distances.append(float(distance))
            step += 1
            if step % 50 == 0:
                print(
                    f"step {step}/{args.steps} distance {np.mean(distances[-50:]):.3f} px ({time.time() - began:.0f} s)",
                    file=sys.stderr,
                )
            if step % args.val_every == 0 or step == args.steps:
                refiner.eval()
                served, refined = placement(tiles, refiner, args.radius)
                record = {
                    "event": "val",
                    "step": step,
                    "train_px": float(np.mean(distances[-50:])),
                    "served": served,
                    "refined": refined,
                    "seconds": time.time() - began,
                }
                log.write(record)
                print(json.dumps(record), file=sys.stderr)
                torch.save({"config": refiner.cfg.to_dict(), "state_dict": refiner.state_dict()}, out / "refiner.pt")
            if step >= args.steps:
                break


def pipeline_comparison(model, refiner: PointRefiner, tiles, radius: float):
    """bPQ / AJI / detection F1 of the whole pipeline with the points as served and refined."""
    accs = {
        name: MetricAccumulator(num_classes=model.config.num_classes, radius=radius) for name in ("served", "refined")
    }
    for image, gt, _, pts, classes, _ in tiles:
        for name, points in (("served", pts), ("refined", refine_points(refiner, image, pts))):
            labels = (
                segment_tile(model, image, points=points, point_classes=classes)[0]
                if len(points)
                else np.zeros_like(gt)
            )
            accs[name].add(gt, labels)
    return {name: {k: acc.summary()[k] for k in ("bpq", "aji", "det_f1")} for name, acc in accs.items()}


def attach(checkpoint: dict, refiner: PointRefiner, report: dict, run: dict) -> dict:
    """The checkpoint with the refiner in its config, weights, training record and metrics."""
    out = dict(checkpoint)
    out["config"] = dict(checkpoint["config"], point_refiner=refiner.cfg.to_dict())
    model_state = {k: v for k, v in checkpoint["model"].items() if not k.startswith("point_refiner.")}
    model_state.update({f"point_refiner.{k}": v.detach().cpu() for k, v in refiner.state_dict().items()})
    out["model"] = model_state
    out["training"] = dict(checkpoint.get("training") or {}, point_refiner=run)
    metrics = dict(checkpoint.get("metrics") or {}, point_refiner=report)
    if "validation" in metrics:
        metrics["validation_without_point_refiner"] = metrics.pop("validation")
    out["metrics"] = metrics
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    common.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = common.RunLog(out / "log.jsonl")

    checkpoint = common.read_init(args.checkpoint)
    if (checkpoint.get("config") or {}).get("point_refiner"):
        # Measure against the prompt learner's own points: build the model without its refiner.
        checkpoint = dict(checkpoint, config=dict(checkpoint["config"], point_refiner=None))
        checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if not k.startswith("point_refiner.")}
        metrics = {k: v for k, v in (checkpoint.get("metrics") or {}).items() if k != "point_refiner"}
        if "validation_without_point_refiner" in metrics:
            metrics["validation"] = metrics.pop("validation_without_point_refiner")
        checkpoint["metrics"] = metrics
    model = build_cfr_sam(None, checkpoint=checkpoint)
    model.eval()
    args.data = args.data or str(common.default_data_root())
    train_set, val_set = common.build_datasets(args, model.config.class_names, model.config.input_size)
    tiles = served_points(model, val_set, args.min_foreground, args.nms_radius)
    log.write({"event": "start", "args": vars(args), "train_images": len(train_set), "val_tiles": len(tiles)})

    if args.refiner:
        saved = torch.load(args.refiner, map_location="cpu")
        refiner = PointRefiner(PointRefinerConfig.from_dict(saved["config"]))
        refiner.load_state_dict(saved["state_dict"])
    else:
        refiner = PointRefiner(
            PointRefinerConfig(
                crop=args.crop,
                width=args.width,
                stem_width=args.stem_width,
                dilations=tuple(int(d) for d in args.dilations.split(",")),
            )
        )
        train(args, refiner, train_set, tiles, log, out, model)
    refiner.eval()
    served, refined = placement(tiles, refiner, args.radius)
    report = {"tiles": len(tiles), "placement": {"served": served, "refined": refined}}
    if not args.no_pipeline:
        report["pipeline"] = pipeline_comparison(model, refiner, tiles, args.radius)
    log.write({"event": "report", **report})
    print(json.dumps(report, indent=1))
    if args.write_checkpoint:
        run = {"refiner": args.refiner, "args": {k: v for k, v in vars(args).items() if k != "write_checkpoint"}}
        attached = attach(checkpoint, refiner, report, run)
        # The whole model's validation (as finalize records it), now with the refiner serving.
        refined_model = build_cfr_sam(None, checkpoint=attached)
        refined_model.eval()
        val = validate_pipeline(
            refined_model,
            val_set,
            torch.device("cpu"),
            0,
            args.radius,
            min_foreground=args.min_foreground,
            nms_radius=args.nms_radius,
        )
        attached["metrics"]["validation"] = val
        log.write({"event": "validation", **{k: v for k, v in val.items() if isinstance(v, (int, float))}})
        print(
            "validation with the refiner: " + " ".join(f"{k}={v:.4f}" for k, v in val.items() if isinstance(v, float)),
            file=sys.stderr,
        )
        torch.save(attached, args.write_checkpoint)
        print(f"wrote {args.write_checkpoint}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
