"""Stage 1: train the prompt learner (paper §3.3).

    python -m cfrsam.train.stage1 --out runs/stage1 [--config tiny] [--epochs 40] [--resume]

Hungarian matching of anchors to ground-truth centroids (score p_class(gt) - 0.1 * distance),
cross-entropy with a background weight, regression loss on matched anchors, focal loss on the
auxiliary foreground mask. Validation each epoch on held-out CoNSeP sources: detection precision,
recall and F1 (centroids paired one-to-one within --radius px) and type accuracy, the definitions
of the evaluation module. Writes OUT/last.pt (resumable), OUT/best.pt (a CFR-SAM checkpoint whose
prompt learner is the best by detection F1) and OUT/log.jsonl.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..build import build_cfr_sam
from ..checkpoint import CheckpointError, save_checkpoint
from ..data import collate_nuclei
from ..inference import point_nms
from ..metrics import pair_points
from ..prompt_learner import PromptLearnerLoss, decode_prompts
from . import common
from .domain import DomainClassifier, domains_by_name, reversal_schedule


# Pairing radius of the placement-aware detection F1 (`det_f1_placed`): a point counts only when
# it lands within this many pixels of a centroid. The segmentation stage loses bPQ quickly once
# its prompt is more than ~2.5 px off the centre (README, "Where the prompts sit"), so the 12 px
# radius of the classic detection F1 says too little about the prompts' use.
PLACED_RADIUS = 4.0


def add_select_arg(parser: argparse.ArgumentParser, picks: str) -> None:
    """--select: the detection metric (of `validate`) that picks `picks`."""
    parser.add_argument(
        "--select",
        choices=("det_f1", "det_f1_placed"),
        default="det_f1",
        help=f"what picks {picks}: detection F1 within --radius, or within {PLACED_RADIUS:g} px (rewards points "
        "placed near the centre, which the masks need)",
    )


def validate(model, loader, device, radius: float, min_foreground: float, nms_radius: float):
    """Pooled detection counts over the validation set, and where the paired points sit.

    placement_mean / _median / _p90: distance (px) of each paired point from its centroid.
    """
    tp = fp = fn = correct = placed = 0
    distances = []
    model.prompt_learner.eval()
    with torch.no_grad():
        for batch in loader:
            image = batch["image"].to(device)
            out = model.prompt_learner(image)
            for i, det in enumerate(decode_prompts(out["points"], out["logits"], min_foreground)):
                # The prompter service's rule: points clipped to the tile, NMS ranked by foreground.
                pts = np.clip(det["points"].cpu().numpy(), 0, image.shape[-1])
                cls = det["classes"].cpu().numpy()
                keep = point_nms(pts, det["foreground"].cpu().numpy(), nms_radius)
                pts, cls = pts[keep], cls[keep]
                gt = batch["centroids"][i].numpy()
                gt_cls = batch["classes"][i].numpy()
                pairs = pair_points(gt, pts, radius)
                offsets = np.linalg.norm(gt[pairs[:, 0]] - pts[pairs[:, 1]], axis=1) if len(pairs) else np.zeros(0)
                distances.append(offsets)
                # pair_points assigns on all distances, then keeps those within the radius: the
                # pairs within PLACED_RADIUS are these pairs' closest ones, no second assignment.
                placed += int((offsets <= PLACED_RADIUS).sum())
                tp += len(pairs)
                fp += len(pts) - len(pairs)
                fn += len(gt) - len(pairs)
                correct += int(sum(gt_cls[g] == cls[p] for g, p in pairs))
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    distances = np.concatenate(distances) if distances else np.zeros(0)
    n_pred, n_gt = tp + fp, tp + fn
    return {
        "det_precision": precision,
        "det_recall": recall,
        "det_f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "det_f1_placed": 2 * placed / max(n_pred + n_gt, 1),
        "type_accuracy": correct / max(tp, 1),
        "placement_mean": float(distances.mean()) if len(distances) else 0.0,
        "placement_median": float(np.median(distances)) if len(distances) else 0.0,
        "placement_p90": float(np.percentile(distances, 90)) if len(distances) else 0.0,
    }


def class_frequencies(dataset, num_classes: int) -> np.ndarray:
    """Nuclei per known class over the training samples' whole images (no crops, no augmentation)."""
    counts = np.zeros(num_classes, dtype=np.float64)
    parts = dataset.datasets if hasattr(dataset, "datasets") else [dataset]
    for part in parts:
        for name in part.names:
            _, _, _, (_, pixels), classes = part._load(name)
            present = classes[1:][pixels[1:] > 0]
            present = present[(present >= 0) & (present < num_classes)]
            counts += np.bincount(present, minlength=num_classes)[:num_classes]
    return counts


def resolve_class_weights(spec: str, dataset, num_classes: int):
    """--class-weights -> list of num_classes floats, or None (unweighted)."""
    if not spec:
        return None
    if spec == "balanced":
        counts = class_frequencies(dataset, num_classes)
        if (counts <= 0).any():
            sys.exit(f"--class-weights balanced: a class has no training nuclei ({counts.tolist()})")
        freq = counts / counts.sum()
        weights = 1.0 / np.sqrt(freq)
        # Normalised so the average weight of a training nucleus stays 1: the balance against the
        # background weight is unchanged, only the classes are reweighted among themselves.
        return [float(w) for w in weights / float((freq * weights).sum())]
    try:
        weights = [float(x) for x in spec.split(",")]
    except ValueError:
        sys.exit(f"--class-weights: expected 'balanced' or {num_classes} numbers, got {spec!r}")
    if len(weights) != num_classes or min(weights) <= 0:
        sys.exit(f"--class-weights: expected {num_classes} positive numbers, got {spec!r}")
    return weights


def build_model(args):
    """The model to train: from --config or --init, with --prompt-learner's preset if given."""
    init = common.read_init(args.init) if args.init else None
    overrides = {}
    if args.prompt_learner:
        overrides["prompt_learner"] = args.prompt_learner
        if init is not None:
            # A different backbone cannot take the old learner's weights; it starts from the seed.
            init = {**init, "model": {k: v for k, v in init["model"].items() if not k.startswith("prompt_learner.")}}
            init["config"] = {**init["config"], "prompt_learner": args.prompt_learner}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="checkpoint has no prompt learner weights")
        return build_cfr_sam(args.config if init is None else None, checkpoint=init, seed=args.seed, **overrides)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--background-weight", type=float, default=0.4)
    parser.add_argument("--regression-weight", type=float, default=5e-3)
    parser.add_argument(
        "--regression",
        choices=("l2", "smooth_l1"),
        default="l2",
        help="point regression loss: squared error (the paper's) or smooth L1 (constant pull at a few px off)",
    )
    parser.add_argument(
        "--dense-regression",
        choices=("", "radius", "inside"),
        default="",
        help="also regress other anchors' points onto a centroid: those within --dense-regression-radius px of "
        "one ('radius') or those on a nucleus ('inside'); default: only the matched anchors, as the paper. The "
        "points NMS keeps are often not the matched ones",
    )
    parser.add_argument("--dense-regression-radius", type=float, default=12.0, help="px, for --dense-regression radius")
    parser.add_argument(
        "--dense-regression-weight",
        type=float,
        default=1e-3,
        help="weight of the dense regression loss (summed over the anchors near each nucleus, so several per "
        "nucleus: lower than --regression-weight)",
    )
    parser.add_argument(
        "--head-lr-mult",
        type=float,
        default=1.0,
        help="learning-rate multiplier of the point heads (offset and regression): their outputs are in pixels, "
        "so moving a point several pixels takes large weights, slow at the backbone's rate",
    )
    parser.add_argument(
        "--quality-sigma",
        type=float,
        default=0.0,
        help="px; > 0: an unmatched anchor whose point lies d px from a centroid is trained towards "
        "foreground exp(-d^2 / 2 sigma^2) instead of background, so the foreground score (what NMS keeps by) "
        "ranks neighbouring anchors by where their points land; 0: one-to-one targets, as the paper",
    )
    add_select_arg(parser, "best.pt")
    parser.add_argument("--radius", type=float, default=12.0, help="detection pairing radius (px)")
    parser.add_argument(
        "--class-weights",
        default="",
        help="cross-entropy weights of the nucleus classes: comma-separated (one per class), "
        "'balanced' (inverse square root of the training frequency, mean 1 per nucleus) or empty (all 1)",
    )
    parser.add_argument(
        "--prompt-learner",
        default="",
        help="prompt-learner preset (femto, nano, tiny, small) replacing the config's; with --init the "
        "rest of the model keeps the initial weights and the prompt learner starts fresh",
    )
    parser.add_argument(
        "--domain-adversarial",
        type=float,
        default=0.0,
        help="weight of the domain-adversarial loss (AMA-SAM's multi-dataset alignment: a classifier of "
        "the source set behind a gradient reversal on the deepest backbone features); 0: off",
    )
    args = parser.parse_args(argv)

    device, out, log = common.start_run(args)

    try:
        model = build_model(args)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        sys.exit(str(e))
    model.to(device)
    if args.bf16:
        common.make_autocast_safe(model)
    if args.channels_last:
        model.prompt_learner.to(memory_format=torch.channels_last)
    size = model.config.input_size
    train_set, val_set = common.build_datasets(args, model.config.class_names, size)
    train_loader = common.make_loader(train_set, args.batch_size, True, args.workers, args.seed, collate_nuclei)
    val_loader = common.make_loader(val_set, args.batch_size, False, 0, args.seed, collate_nuclei) if val_set else None

    learner = model.prompt_learner
    for p in model.parameters():
        p.requires_grad_(False)
    for p in learner.parameters():
        p.requires_grad_(True)
    adversary, domain_of, captured = None, {}, {}
    if args.domain_adversarial > 0:
        parts = train_set.datasets if hasattr(train_set, "datasets") else [train_set]
        try:
            domain_of = domains_by_name(parts)
            adversary = DomainClassifier(learner.cfg.backbone_dims[-1], len(parts)).to(device)
        except ValueError as e:
            sys.exit(f"--domain-adversarial: {e}")
        # The deepest backbone stage, as the learner computes it in its forward pass.
        learner.backbone.register_forward_hook(lambda _m, _i, output: captured.__setitem__("features", output[-1]))
    trained = list(learner.parameters()) + (list(adversary.parameters()) if adversary is not None else [])
    point_heads = [p for n, p in learner.named_parameters() if n.startswith(("offset_head.", "regression_head."))]
    groups = [
        {"params": [p for p in trained if all(p is not q for q in point_heads)]},
        {"params": point_heads, "lr": args.lr * args.head_lr_mult},
    ]
    optimizer, scheduler, steps_per_epoch = common.make_optimizer(groups, args, len(train_loader))
    class_weights = resolve_class_weights(args.class_weights, train_set, model.config.num_classes)
    criterion = PromptLearnerLoss(
        background_weight=args.background_weight,
        regression_weight=args.regression_weight,
        regression=args.regression,
        class_weights=class_weights,
        dense_regression=args.dense_regression,
        dense_regression_radius=args.dense_regression_radius,
        dense_regression_weight=args.dense_regression_weight,
        quality_sigma=args.quality_sigma,
    )

    start_epoch, best = 1, {args.select: -1.0}
    state = None
    if args.resume and (out / "last.pt").exists():
        state = common.load_training_state(out / "last.pt", model, optimizer, scheduler)
        start_epoch, best = state["epoch"] + 1, state["best"]
        if adversary is not None:
            adversary.load_state_dict(state["extra"]["auxiliary"])
        print(f"resumed from {out / 'last.pt'} at epoch {start_epoch}", file=sys.stderr)
    ema = common.make_weight_average(model, args, state)
    log.write(
        {
            "event": "start",
            "stage": 1,
            "args": vars(args),
            "train_images": len(train_set),
            "class_weights": class_weights,
            "val_images": len(val_set) if val_set else 0,
            "device": str(device),
        }
    )

    # Steps taken so far (the gradient reversal ramps up over the whole schedule).
    global_step = [(start_epoch - 1) * steps_per_epoch]

    def begin_epoch(epoch):
        learner.train()
        if adversary is not None:
            adversary.train()

    def loss_of_batch(batch, _context):
        image = batch["image"].to(device)
        if args.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with common.autocast(device, args.bf16):
            outputs = learner(image)
        targets = {
            "centroids": [c.to(device) for c in batch["centroids"]],
            "classes": [c.to(device) for c in batch["classes"]],
            "foreground": batch["foreground"].to(device),
            "instances": batch["instances"].to(device),
        }
        losses = criterion(common.to_float(outputs), targets)
        if adversary is not None:
            global_step[0] += 1
            done = global_step[0] / (args.epochs * steps_per_epoch)
            domains = torch.tensor([domain_of[n] for n in batch["name"]], device=device)
            logits = adversary(captured["features"], reversal_schedule(done))
            losses["loss_domain"] = F.cross_entropy(logits, domains)
            losses["domain_accuracy"] = (logits.argmax(-1) == domains).float().mean().detach()
            losses["loss"] = losses["loss"] + args.domain_adversarial * losses["loss_domain"]
        return losses

    def validate_epoch(_epoch):
        if not val_loader:
            return {}
        return validate(model, val_loader, device, args.radius, args.min_foreground, args.nms_radius)

    def save_best(epoch, val):
        save_checkpoint(
            out / "best.pt",
            model.cpu(),
            training={"stage1": {"epoch": epoch, "args": vars(args)}},
            metrics={"stage1": val},
        )
        model.to(device)

    best = common.run_epochs(
        stage=1,
        args=args,
        out=out,
        log=log,
        loader=train_loader,
        steps_per_epoch=steps_per_epoch,
        params=trained,
        optimizer=optimizer,
        scheduler=scheduler,
        model=model,
        start_epoch=start_epoch,
        best=best,
        select=args.select,
        begin_epoch=begin_epoch,
        loss_of_batch=loss_of_batch,
        validate=validate_epoch,
        save_best=save_best,
        auxiliary=adversary,
        ema=ema,
    )
    if not val_loader:
        save_checkpoint(out / "best.pt", model.cpu(), training={"stage1": {"args": vars(args)}})
    log.write({"event": "end", "stage": 1, "best": best})
    print(f"best: {best}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
