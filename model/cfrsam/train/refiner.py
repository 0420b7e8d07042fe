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
    """(points [P, 2], image_index [P], targets [P, 2], classes [P]) drawn from a collated batch:
    the class is the target nucleus' (UNKNOWN_CLASS -1 for the sets without CoNSeP's classes)."""
    points, index, targets, classes = [], [], [], []
    size = batch["image"].shape[-1]
    for b, centroids in enumerate(batch["centroids"]):
        centroids = centroids.numpy().reshape(-1, 2)
        if len(centroids) == 0:
            continue
        chosen = rng.choice(len(centroids), size=min(per_image, len(centroids)), replace=False)
        sigma = rng.uniform(0, jitter, size=(len(chosen), 1))
        moved = np.clip(centroids[chosen] + rng.normal(0, 1, (len(chosen), 2)) * sigma, 0, size - 1e-3)
        under = batch["instances"][b].numpy()[moved[:, 1].astype(int), moved[:, 0].astype(int)]
        target_index = np.where(under > 0, np.maximum(under - 1, 0), chosen)
        points.append(moved)
        targets.append(centroids[target_index])
        classes.append(_nucleus_classes(batch, b, target_index))
        index.append(np.full(len(chosen), b))

    def cat(xs, dtype):
        return torch.from_numpy(np.concatenate(xs)).to(dtype) if xs else torch.zeros((0,), dtype=dtype)

    return cat(points, torch.float32), cat(index, torch.long), cat(targets, torch.float32), cat(classes, torch.long)


def _nucleus_classes(batch, b: int, nucleus_index: np.ndarray) -> np.ndarray:
    """Classes of the batch item's nuclei (0-based instance indices), -1 where unknown or absent."""
    known = batch["classes"][b].numpy().reshape(-1) if "classes" in batch else np.zeros(0, dtype=np.int64)
    out = np.full(len(nucleus_index), -1, dtype=np.int64)
    inside = nucleus_index < len(known)
    out[inside] = known[nucleus_index[inside]]
    return out


def lies_on_nucleus(points: np.ndarray, instances: np.ndarray, centroids: np.ndarray, radius: float) -> np.ndarray:
    """[P] bool: each point (x, y) lies on an annotated nucleus or within `radius` px of a centroid,
    the score head's label."""
    if len(points) == 0:
        return np.zeros(0, dtype=bool)
    cells = np.clip(points, 0, instances.shape[-1] - 1e-3).astype(int)
    on = instances[cells[:, 1], cells[:, 0]] > 0
    if len(centroids):
        on |= np.linalg.norm(points[:, None, :] - centroids[None, :, :], axis=-1).min(1) <= radius
    return on


@torch.no_grad()
def prompter_batch(model, batch, min_foreground: float, nms_radius: float, radius: float, on_radius: float = 6.0):
    """The prompt learner's own kept points on a collated batch: (points [P, 2], image_index [P],
    targets [P, 2], has_target [P], on_nucleus [P], classes [P]). A point's target is the centroid of
    the nucleus under it, else of the nearest one within `radius` px (has_target False when there is
    none; its class is then -1, as for unknown classes); it is on a nucleus when it lies on one or
    within `on_radius` px of a centroid."""
    points, index, targets, has_target, on_nucleus, classes = [], [], [], [], [], []
    for b, centroids in enumerate(batch["centroids"]):
        centroids = centroids.numpy().reshape(-1, 2)
        pts = detect_points(model, batch["image"][b : b + 1], min_foreground, nms_radius)[0]
        if len(pts) == 0:
            continue
        size = batch["image"].shape[-1]
        cells = np.clip(pts, 0, size - 1e-3).astype(int)
        under = batch["instances"][b].numpy()[cells[:, 1], cells[:, 0]]
        if len(centroids):
            distance = np.linalg.norm(pts[:, None, :] - centroids[None, :, :], axis=-1)
            nearest = distance.argmin(1)
            nearest_distance = distance[np.arange(len(pts)), nearest]
            target_index = np.where(under > 0, under - 1, nearest)
            targets.append(centroids[target_index])
        else:
            nearest_distance = np.full(len(pts), np.inf)
            target_index = np.zeros(len(pts), dtype=np.int64)
            targets.append(pts.copy())
        has_target.append((under > 0) | (nearest_distance <= radius))
        classes.append(np.where(has_target[-1], _nucleus_classes(batch, b, target_index), -1))
        on_nucleus.append(lies_on_nucleus(pts, batch["instances"][b].numpy(), centroids, on_radius))
        points.append(pts)
        index.append(np.full(len(pts), b))
    if not points:
        empty = torch.zeros((0,), dtype=torch.bool)
        no_class = torch.zeros((0,), dtype=torch.long)
        return torch.zeros((0, 2)), torch.zeros((0,), dtype=torch.long), torch.zeros((0, 2)), empty, empty, no_class
    return (
        torch.from_numpy(np.concatenate(points)).float(),
        torch.from_numpy(np.concatenate(index)).long(),
        torch.from_numpy(np.concatenate(targets)).float(),
        torch.from_numpy(np.concatenate(has_target)),
        torch.from_numpy(np.concatenate(on_nucleus)),
        torch.from_numpy(np.concatenate(classes)).long(),
    )


def background_batch(batch, per_image: int, clearance: float, rng: np.random.Generator):
    """Points on no nucleus, `clearance` px or more from every centroid: (points [P, 2], image_index [P]),
    negatives for the score head beside the prompter's own."""
    points, index = [], []
    for b, centroids in enumerate(batch["centroids"]):
        centroids = centroids.numpy().reshape(-1, 2)
        instances = batch["instances"][b].numpy()
        size = instances.shape[-1]
        drawn = rng.uniform(0, size, size=(per_image * 4, 2)).astype(np.float32)
        cells = drawn.astype(int)
        free = instances[cells[:, 1], cells[:, 0]] == 0
        if len(centroids):
            free &= np.linalg.norm(drawn[:, None, :] - centroids[None, :, :], axis=-1).min(1) >= clearance
        drawn = drawn[free][:per_image]
        points.append(drawn)
        index.append(np.full(len(drawn), b))
    return torch.from_numpy(np.concatenate(points)).float(), torch.from_numpy(np.concatenate(index)).long()


@torch.no_grad()
def served_points(model, val_set, min_foreground: float, nms_radius: float):
    """Per validation tile: (image, gt instances, centroids, points, classes, foreground, gt
    classes {instance id: class}, the learner's class probabilities [P, K])."""
    tiles = []
    for i in range(len(val_set)):
        item = val_set[i]
        image = item["image"][None]
        pts, classes, _, foreground, probs = detect_points(model, image, min_foreground, nms_radius, class_probs=True)
        gt_classes = {j + 1: int(c) for j, c in enumerate(item["classes"].tolist())}
        centroids = item["centroids"].numpy().reshape(-1, 2)
        tiles.append((image, item["instances"].numpy(), centroids, pts, classes, foreground, gt_classes, probs))
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
    for image, _, centroids, pts, *_ in tiles:
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
    common.add_sampling_args(parser)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per step")
    parser.add_argument("--per-image", type=int, default=24, help="nuclei drawn per tile per step")
    parser.add_argument("--jitter", type=float, default=6.0, help="largest std (px per axis) of the noise")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--crop", type=int, default=PointRefinerConfig.crop)
    parser.add_argument("--width", type=int, default=PointRefinerConfig.width)
    parser.add_argument("--stem-width", type=int, default=PointRefinerConfig.stem_width)
    parser.add_argument("--dilations", default=",".join(map(str, PointRefinerConfig.dilations)))
    parser.add_argument("--score-head", action="store_true", help="also learn whether each point is on a nucleus")
    parser.add_argument("--score-weight", type=float, default=1.0, help="weight of the score head's cross-entropy")
    parser.add_argument("--on-radius", type=float, default=6.0, help="a point this close to a centroid is on it")
    parser.add_argument("--background-points", type=int, default=8, help="background negatives per tile and step")
    parser.add_argument("--min-scores", default="0.2,0.3,0.4,0.5", help="score thresholds the report compares")
    parser.add_argument("--min-score", type=float, default=0.0, help="the threshold the attached refiner serves")
    parser.add_argument("--class-head", action="store_true", help="also learn each nucleus' class")
    parser.add_argument("--class-loss-weight", type=float, default=1.0, help="weight of the class cross-entropy")
    parser.add_argument("--class-weights", default="balanced", help="'balanced' or K numbers (stage 1's rule)")
    parser.add_argument("--class-mixes", default="0.25,0.5,0.75,1", help="class weights w the report compares")
    parser.add_argument("--class-mix", type=float, default=0.0, help="the class weight w the attached refiner serves")
    # The heads' inputs and size (default: --init's, else PointRefinerConfig's).
    parser.add_argument("--context-crop", type=int, help="the heads also read this wider window (px; 0: none)")
    parser.add_argument("--context-width", type=int, help="channels of the context window's net")
    parser.add_argument("--head-branch", type=int, help="channels of a stride-2 branch for the heads (0: none)")
    parser.add_argument("--score-hidden", type=int, help="hidden units of the score and class heads")
    parser.add_argument(
        "--init", help="start from this refiner.pt (heads new or of another shape, and their inputs, start untrained)"
    )
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
    step, began, distances, score_losses, class_losses = 0, time.time(), [], [], []
    class_weights = None
    if refiner.classify is not None and getattr(args, "class_weights", ""):
        from .stage1 import resolve_class_weights

        class_weights = torch.tensor(resolve_class_weights(args.class_weights, train_set, refiner.cfg.num_classes))
    while step < args.steps:
        for batch in loader:
            refiner.train()
            points, index, targets, classes = training_batch(batch, args.per_image, args.jitter, rng)
            has_target = torch.ones(len(points), dtype=torch.bool)
            # The score head learns on the learner's own points (on a nucleus or not) and background.
            scored = torch.zeros(len(points), dtype=torch.bool)
            on_nucleus = torch.ones(len(points), dtype=torch.bool)
            if model is not None and getattr(args, "prompter_points", False):
                more = prompter_batch(model, batch, args.min_foreground, args.nms_radius, args.radius, args.on_radius)
                points, index, targets = (torch.cat(pair) for pair in zip((points, index, targets), more[:3]))
                has_target = torch.cat((has_target, more[3]))
                scored = torch.cat((scored, torch.ones(len(more[0]), dtype=torch.bool)))
                on_nucleus = torch.cat((on_nucleus, more[4]))
                classes = torch.cat((classes, more[5]))
            if refiner.score is not None and args.background_points:
                bg_points, bg_index = background_batch(batch, args.background_points, args.on_radius + 2, rng)
                points, index = torch.cat((points, bg_points)), torch.cat((index, bg_index))
                targets = torch.cat((targets, bg_points))
                has_target = torch.cat((has_target, torch.zeros(len(bg_points), dtype=torch.bool)))
                scored = torch.cat((scored, torch.ones(len(bg_points), dtype=torch.bool)))
                on_nucleus = torch.cat((on_nucleus, torch.zeros(len(bg_points), dtype=torch.bool)))
                classes = torch.cat((classes, torch.full((len(bg_points),), -1, dtype=torch.long)))
            if not bool(has_target.any()):  # no nucleus in any of the batch's crops
                continue
            offsets = targets - refiner.crop_origins(points, size).float()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits, score_logits, class_logits = refiner.heads(
                    refiner.crops(batch["image"], points, index), refiner.context_crops(batch["image"], points, index)
                )
            # A heat-map loss (cross-entropy against a Gaussian at the target) trains the map fast;
            # the distance of its expectation is what serving uses.
            logits, offsets = logits[has_target], offsets[has_target]
            distance = (refiner.expectation(logits) - offsets).norm(dim=-1).mean()
            heat = -(refiner.target_distribution(offsets, args.heat_sigma) * logits.log_softmax(-1)).sum(-1).mean()
            loss = heat + args.distance_weight * distance
            if score_logits is not None and bool(scored.any()):
                score_loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    score_logits[scored], on_nucleus[scored].float()
                )
                loss = loss + args.score_weight * score_loss
                score_losses.append(float(score_loss))
            known = classes >= 0
            if class_logits is not None and bool(known.any()):
                class_loss = torch.nn.functional.cross_entropy(
                    class_logits[known], classes[known], weight=class_weights
                )
                loss = loss + args.class_loss_weight * class_loss
                class_losses.append(float(class_loss))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            distances.append(float(distance))
            step += 1
            if step % 50 == 0:
                print(
                    f"step {step}/{args.steps} distance {np.mean(distances[-50:]):.3f} px"
                    + (f" score loss {np.mean(score_losses[-50:]):.4f}" if score_losses else "")
                    + (f" class loss {np.mean(class_losses[-50:]):.4f}" if class_losses else "")
                    + f" ({time.time() - began:.0f} s)",
                    file=sys.stderr,
                )
            if step % args.val_every == 0 or step == args.steps:
                refiner.eval()
                served, refined = placement(tiles, refiner, args.radius)
                record = {
                    "event": "val",
                    "step": step,
                    "train_px": float(np.mean(distances[-50:])),
                    **({"train_score_loss": float(np.mean(score_losses[-50:]))} if score_losses else {}),
                    **({"train_class_loss": float(np.mean(class_losses[-50:]))} if class_losses else {}),
                    "served": served,
                    "refined": refined,
                    **(
                        {"score_separation": score_separation(tiles, refiner, args.on_radius)}
                        if refiner.score is not None
                        else {}
                    ),
                    "seconds": time.time() - began,
                }
                log.write(record)
                print(json.dumps(record), file=sys.stderr)
                torch.save({"config": refiner.cfg.to_dict(), "state_dict": refiner.state_dict()}, out / "refiner.pt")
            if step >= args.steps:
                break


def pipeline_comparison(model, refiner: PointRefiner, tiles, radius: float, min_scores=(), class_mixes=()):
    """bPQ / AJI / detection F1 / mPQ of the whole pipeline (PyTorch, prompts given, so overlaps
    resolve by predicted IoU alone) with the points as served; refined (and merged as the prompter
    merges them); for each threshold in `min_scores`, refined with those the score head puts below
    it dropped; and, on the refined points, their classes mixed with the class head's at each
    weight in `class_mixes`."""
    from ..inference import point_nms
    from ..prompt_learner.point_refiner import mix_class_probabilities

    names = ["served", "refined"] + [f"scored_{t:g}" for t in min_scores] + [f"class_mix_{w:g}" for w in class_mixes]
    accs = {name: MetricAccumulator(num_classes=model.config.num_classes, radius=radius) for name in names}
    keys = ("bpq", "aji", "det_f1", "mpq", "type_accuracy")
    for image, gt, _, pts, classes, foreground, gt_classes, probs in tiles:
        if len(pts):
            with torch.no_grad():
                refined, scores, refiner_probs = refiner.refine_and_score(image, torch.from_numpy(pts).float())
            refined = np.clip(refined.numpy(), 0, image.shape[-1] - 1e-3)
            scores = scores.numpy()
        else:
            refined, scores, refiner_probs = pts, np.zeros(0), torch.zeros(0, 1)
        point_sets = {"served": (pts, np.arange(len(pts)))}
        for name, threshold in [("refined", None)] + [(f"scored_{t:g}", t) for t in min_scores]:
            chosen = np.arange(len(refined)) if threshold is None else np.flatnonzero(scores >= threshold)
            kept = chosen[point_nms(refined[chosen], foreground[chosen], refiner.cfg.nms_radius)]
            point_sets[name] = (refined[kept], kept)
        # Each point set is segmented once, labelled by point; classes only relabel the instances.
        segmented = {}
        for name, (points, kept) in point_sets.items():
            if len(points):
                labels, owner = segment_tile(model, image, points=points, point_classes=np.arange(len(points)))
                segmented[name] = (labels, {i: int(kept[j]) for i, j in owner.items()})
            else:
                segmented[name] = (np.zeros_like(gt), {})
        for name in names:
            base = name if name in point_sets else "refined"
            labels, owner = segmented[base]
            point_classes = classes
            if name.startswith("class_mix_") and len(pts):
                weight = float(name[len("class_mix_") :])
                mixed = mix_class_probabilities(torch.from_numpy(probs).float(), refiner_probs.float(), weight)
                point_classes = mixed.argmax(-1).numpy()
            accs[name].add(gt, labels, gt_classes, {i: int(point_classes[j]) for i, j in owner.items()})
    return {name: {k: acc.summary()[k] for k in keys} for name, acc in accs.items()}


def score_separation(tiles, refiner: PointRefiner, on_radius: float):
    """How well the score head and the prompter's foreground tell the served points on a nucleus
    (on one or within `on_radius` px of a centroid) from the rest: ROC AUC of each, and the counts."""
    labels, fg, head = [], [], []
    for image, gt, centroids, pts, _, foreground, *_ in tiles:
        if len(pts) == 0:
            continue
        with torch.no_grad():
            _, scores, _ = refiner.refine_and_score(image, torch.from_numpy(pts).float())
        labels.append(lies_on_nucleus(pts, gt, centroids, on_radius))
        fg.append(foreground)
        head.append(scores.numpy())
    labels, fg, head = np.concatenate(labels), np.concatenate(fg), np.concatenate(head)

    def auc(score):
        order = np.argsort(score, kind="stable")
        ranks = np.empty(len(score))
        ranks[order] = np.arange(1, len(score) + 1)
        pos = labels.sum()
        neg = len(labels) - pos
        return float((ranks[labels].sum() - pos * (pos + 1) / 2) / max(pos * neg, 1))

    return {
        "points": int(len(labels)),
        "on_nucleus": int(labels.sum()),
        "auc_foreground": auc(fg),
        "auc_score": auc(head),
        "auc_product": auc(fg * head),
    }


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
        else:
            # Measured with the refiner being replaced (a bundle records no validation without it).
            metrics.pop("validation", None)
        checkpoint["metrics"] = metrics
    model = build_cfr_sam(None, checkpoint=checkpoint)
    model.eval()
    args.data = args.data or str(common.default_data_root())
    train_set, val_set = common.build_datasets(args, model.config.class_names, model.config.input_size)
    tiles = served_points(model, val_set, args.min_foreground, args.nms_radius)
    log.write({"event": "start", "args": vars(args), "train_images": len(train_set), "val_tiles": len(tiles)})

    if args.refiner:
        saved = torch.load(args.refiner, map_location="cpu", weights_only=False)
        cfg = PointRefinerConfig.from_dict(dict(saved["config"], min_score=args.min_score, class_weight=args.class_mix))
        refiner = PointRefiner(cfg)
        refiner.load_state_dict(saved["state_dict"])
    else:
        init = torch.load(args.init, map_location="cpu", weights_only=False) if args.init else None
        heads = {"score_head": args.score_head, "num_classes": model.config.num_classes if args.class_head else 0}
        for key in ("context_crop", "context_width", "head_branch", "score_hidden"):
            if getattr(args, key) is not None:
                heads[key] = getattr(args, key)
        cfg = (
            PointRefinerConfig.from_dict(dict(init["config"], **heads))
            if init
            else PointRefinerConfig(
                crop=args.crop,
                width=args.width,
                stem_width=args.stem_width,
                dilations=tuple(int(d) for d in args.dilations.split(",")),
                **heads,
            )
        )
        refiner = PointRefiner(cfg)
        if init:
            own = refiner.state_dict()
            # Heads whose input grew (context, head branch) start afresh, as new heads do.
            fitting = {k: v for k, v in init["state_dict"].items() if k not in own or own[k].shape == v.shape}
            missing, unexpected = refiner.load_state_dict(fitting, strict=False)
            fresh = ("score.", "classify.", "context_net.", "head_branch.")
            if unexpected or any(not k.startswith(fresh) for k in missing):
                raise ValueError(f"--init {args.init} does not fit: missing {missing}, unexpected {unexpected}")
        train(args, refiner, train_set, tiles, log, out, model)
        refiner.cfg = PointRefinerConfig.from_dict(
            dict(refiner.cfg.to_dict(), min_score=args.min_score, class_weight=args.class_mix)
        )
    refiner.eval()
    served, refined = placement(tiles, refiner, args.radius)
    report = {"tiles": len(tiles), "placement": {"served": served, "refined": refined}}
    if refiner.score is not None:
        report["score_separation"] = score_separation(tiles, refiner, args.on_radius)
    if not args.no_pipeline:
        min_scores = [float(t) for t in args.min_scores.split(",") if t] if refiner.score is not None else []
        mixes = [float(w) for w in args.class_mixes.split(",") if w] if refiner.classify is not None else []
        report["pipeline"] = pipeline_comparison(model, refiner, tiles, args.radius, min_scores, mixes)
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
