"""Stage 2: SAM adaptation (paper §3.4-3.7).

    python -m cfrsam.train.stage2 --out runs/stage2 --stage1 runs/stage1/best.pt [--sam-checkpoint sam.pth]

Point prompts are ground-truth centroids (jittered by a pixel or two), at most --max-prompts (25)
nuclei sampled per image. Loss: L_mask(coarse) + L_mask(refined) + lambda_b * L_boundary with
L_mask = 20 focal + dice + IoU-prediction MSE; BGMR is trained in the refinement mode of the config
(a window around each prompt by default). With --sam-checkpoint the SAM backbone is frozen and only
the adapters (MALA/LoRA/Adapter), HMFM, prompt encoder, mask decoder and BGMR train (PEFT); without
one (no SAM weights can be obtained here) the small config trains fully. The prompt learner from
--stage1 is carried along untouched, so OUT/best.pt is a complete CFR-SAM checkpoint to export.

Validation each epoch on held-out CoNSeP sources runs the whole pipeline (prompter -> encoder ->
decoder -> overlap resolution) and reports bPQ, mPQ, AJI and detection F1 (cfrsam.metrics, the
definitions of the evaluation module); also bPQ with ground-truth prompts, which isolates stage 2.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from ..build import build_cfr_sam
from ..checkpoint import CheckpointError, save_checkpoint
from ..data import collate_nuclei
from ..inference import detect_points, neighbours_within, segment_tile
from ..losses import cfr_sam_loss
from ..metrics import MetricAccumulator
from ..modeling.peft import configure_trainable
from . import common


def sample_prompts(
    batch,
    max_prompts: int,
    jitter: float,
    size: int,
    rng: np.random.Generator,
    off_nucleus: bool = False,
    interior: float = 0.0,
    negatives: int = 0,
    negative_radius: float = 24.0,
):
    """Per image up to max_prompts nuclei: coords [B,P,N,2], labels [B,P,N], targets [B,P,S,S], valid [B,P],
    N = 1 + negatives.

    A prompt is the nucleus' centroid (snapped onto the nucleus when it falls outside) plus Gaussian
    jitter of std `jitter` px. By default a jittered point that leaves the nucleus is snapped back
    onto it; with `off_nucleus` it stays where the jitter put it, as the prompter's points do (their
    offsets from the centroid reach 7-8 px at the 90th percentile, often off a small nucleus), unless
    it lands on another nucleus. With probability `interior` a prompt is instead a point drawn
    uniformly over the nucleus (SAM's own sampling): the prompter's points sit further from the
    centroid on larger nuclei (5.1 px on epithelial nuclei, 2.2 on inflammatory ones), so the
    segmentation stage should answer a point anywhere on the nucleus, not only near its centre.

    With `negatives` K > 0, each prompt also carries the (jittered) centroids of up to K other
    nuclei within `negative_radius` px, nearest first, as negative points (label 0; unused slots are
    padding, label -1), as the serving pipeline gives each prompt its neighbouring detections
    (`inference.negative_prompts`)."""
    b = len(batch["centroids"])
    coords = torch.zeros(b, max_prompts, 1 + negatives, 2)
    labels = -torch.ones(b, max_prompts, 1 + negatives)
    targets = torch.zeros(b, max_prompts, size, size)
    valid = torch.zeros(b, max_prompts, dtype=torch.bool)
    for i in range(b):
        cents = batch["centroids"][i]
        n = cents.shape[0]
        if n == 0:
            continue
        chosen = rng.choice(n, size=min(n, max_prompts), replace=False)
        # Negatives (once per image): the neighbours' centroids, jittered like the prompts.
        neighbours = neighbours_within(cents.numpy(), negatives, negative_radius)
        if negatives > 0:
            others = np.clip(cents.numpy().reshape(-1, 2) + rng.normal(0, jitter, (n, 2)), 0, size - 1e-3)
        for j, k in enumerate(chosen):
            offset = rng.normal(0, jitter, 2)
            xy = cents[k].numpy() + (0.0 if off_nucleus else offset)
            # The centroid of a concave nucleus can fall outside it; a prompt on the nucleus is
            # what a user or the prompter gives, so snap to the nearest pixel of the nucleus.
            mask = batch["instances"][i] == int(k) + 1
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(xs) == 0:
                continue
            if interior > 0 and rng.random() < interior:
                pick = int(rng.integers(len(xs)))
                xy = np.array([float(xs[pick]), float(ys[pick])]) + rng.uniform(0, 1, 2)
            else:
                xy = _placed_near_centroid(
                    xy, offset, mask, xs, ys, batch["instances"][i], int(k) + 1, size, off_nucleus
                )
            coords[i, j, :] = torch.tensor(np.clip(xy, 0, size - 1e-3), dtype=torch.float32)
            labels[i, j, 0] = 1.0
            for slot, o in enumerate(neighbours[k], start=1):
                coords[i, j, slot] = torch.tensor(others[o], dtype=torch.float32)
                labels[i, j, slot] = 0.0
            targets[i, j] = mask.float()
            valid[i, j] = True
    return coords, labels, targets, valid


def served_prompts(
    model,
    batch,
    max_prompts: int,
    size: int,
    rng: np.random.Generator,
    share: float,
    min_foreground: float,
    nms_radius: float,
    radius: float,
    false_points: bool,
    device,
):
    """Prompts where the served pipeline puts them, for a random `share` of the images.

    For each chosen image: the points the prompter would send to the decoder (the learner's
    candidates, its NMS, the point refiner's moves and score bar: inference.detect_points), each
    asking for the nucleus it lies on, or when it lies on background the nucleus whose centroid is
    nearest within `radius` px. The stage then learns to segment from the points it is actually
    given (often off-centre, between two nuclei, on a nucleus' edge) rather than from jittered
    centroids alone. A point near no nucleus is a false detection: with `false_points` it asks for
    an empty mask (the gateway then drops it by area), otherwise it is left out.

    Returns {image index: (coords [P, 2], targets [P, S, S])} for the images it chose."""
    chosen = {}
    for i in range(len(batch["centroids"])):
        if share <= 0 or rng.random() >= share:
            continue
        with torch.no_grad():
            pts, _, _, _ = detect_points(model, batch["image"][i : i + 1].to(device), min_foreground, nms_radius)
        coords, targets = prompt_targets(
            np.clip(pts, 0, size - 1e-3), batch["instances"][i], batch["centroids"][i].numpy(), radius, false_points
        )
        if len(coords) > max_prompts:
            pick = rng.choice(len(coords), size=max_prompts, replace=False)
            coords, targets = [coords[k] for k in pick], [targets[k] for k in pick]
        if coords:
            chosen[i] = (torch.tensor(coords, dtype=torch.float32), torch.stack(targets).float())
    return chosen


def prompt_targets(
    points: np.ndarray, instances: torch.Tensor, centroids: np.ndarray, radius: float, false_points: bool
):
    """(points kept [(x, y)], their target masks [S, S] bool): the nucleus under each point, else
    the one whose centroid is nearest within `radius`, else (with `false_points`) an empty mask."""
    cents = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
    coords, targets = [], []
    for x, y in points:
        own = int(instances[int(y), int(x)])
        if own == 0 and len(cents):
            d = np.hypot(cents[:, 0] - x, cents[:, 1] - y)
            own = int(np.argmin(d)) + 1 if float(d.min()) <= radius else 0
        if own == 0 and not false_points:
            continue
        coords.append((float(x), float(y)))
        targets.append(instances == own if own else torch.zeros_like(instances, dtype=torch.bool))
    return coords, targets


def _placed_near_centroid(xy, offset, mask, xs, ys, instances, own: int, size: int, off_nucleus: bool):
    """The (jittered) centroid `xy` snapped onto the nucleus; with `off_nucleus`, then moved by `offset`."""
    d = (xs.float() + 0.5 - float(xy[0])) ** 2 + (ys.float() + 0.5 - float(xy[1])) ** 2
    nearest = int(torch.argmin(d))
    if float(d[nearest]) > 0.0 and not bool(mask[int(np.clip(xy[1], 0, size - 1)), int(np.clip(xy[0], 0, size - 1))]):
        xy = np.array([float(xs[nearest]) + 0.5, float(ys[nearest]) + 0.5])
    if off_nucleus:
        moved = np.clip(xy + offset, 0, size - 1e-3)
        under = int(instances[int(moved[1]), int(moved[0])])
        # On the background the point stays (the prompter's often do); on another nucleus
        # it would ask for two masks at once, so it stays on this one instead.
        if under in (0, own):
            xy = moved
    return xy


def validate(
    model,
    dataset,
    device,
    limit: int,
    radius: float,
    pipeline: bool = True,
    min_foreground: float = 0.5,
    nms_radius: float = 4.0,
    negatives: int = 0,
    negative_radius: float = 24.0,
):
    """Whole-pipeline metrics on the validation tiles (when `pipeline`), plus bPQ with ground-truth prompts."""
    extra = dict(negatives=negatives, negative_radius=negative_radius)
    acc = MetricAccumulator(num_classes=model.config.num_classes, radius=radius)
    acc_gt = MetricAccumulator(num_classes=model.config.num_classes, radius=radius)
    n = len(dataset) if not limit else min(limit, len(dataset))
    for idx in range(n):
        item = dataset[idx]
        image = item["image"][None].to(device)
        gt = item["instances"].numpy()
        gt_classes = {i + 1: int(c) for i, c in enumerate(item["classes"].tolist())}
        if pipeline:
            pred, pred_classes = segment_tile(model, image, min_foreground, nms_radius, **extra)
            acc.add(gt, pred, gt_classes, pred_classes)
        if len(item["centroids"]):
            pred_gt, _ = segment_tile(model, image, points=item["centroids"].numpy(), **extra)
            acc_gt.add(gt, pred_gt)
    summary = acc.summary() if pipeline else {}
    summary["bpq_gt_prompts"] = acc_gt.summary()["bpq"]
    summary["aji_gt_prompts"] = acc_gt.summary()["aji"]
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument(
        "--stage1",
        help="stage-1 checkpoint or bundle directory (its prompt learner is kept; validation then runs the "
        "whole pipeline)",
    )
    parser.add_argument("--sam-checkpoint", help="official SAM weights: PEFT mode with a frozen backbone")
    parser.add_argument("--max-prompts", type=int, default=25)
    parser.add_argument("--jitter", type=float, default=1.5, help="prompt jitter (px, std)")
    parser.add_argument(
        "--jitter-off-nucleus",
        action="store_true",
        help="let jittered prompts leave the nucleus, as the prompter's points do (default: snap back onto it)",
    )
    parser.add_argument(
        "--interior-prompts",
        type=float,
        default=0.0,
        metavar="P",
        help="share of prompts drawn uniformly over the nucleus instead of at its jittered centroid (SAM's sampling)",
    )
    parser.add_argument(
        "--negatives",
        type=int,
        default=0,
        metavar="K",
        help="give each prompt the centroids of up to K neighbouring nuclei as negative points, in training and "
        "validation (0: a single positive point, as served)",
    )
    parser.add_argument("--negative-radius", type=float, default=24.0, help="px, for --negatives")
    parser.add_argument(
        "--freeze",
        default="",
        help="modules to keep fixed, comma-separated (e.g. image_encoder,hmfm: train only what reads the prompts)",
    )
    parser.add_argument(
        "--conv-stem",
        default="",
        metavar="C1,C2,C3",
        help="give the image encoder a convolutional stem of these widths beside its patch embedding (starts at "
        "zero, so an --init model keeps its output; see ImageEncoderConfig.conv_stem)",
    )
    parser.add_argument(
        "--served-prompts",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of images prompted where the served pipeline puts its points (prompter, NMS, point refiner at "
        "--min-foreground / --nms-radius), each asking for the nucleus under it (see served_prompts); needs a trained "
        "prompt learner (--stage1 or --init)",
    )
    parser.add_argument(
        "--served-false-points",
        action="store_true",
        help="with --served-prompts: served points near no nucleus ask for an empty mask (default: left out)",
    )
    parser.add_argument("--lambda-b", type=float, default=1.0)
    parser.add_argument(
        "--focal-weight", type=float, default=20.0, help="weight of the per-pixel focal term of L_mask (SAM's 20)"
    )
    parser.add_argument(
        "--dice-weight",
        type=float,
        default=1.0,
        help="weight of the dice term of L_mask (SAM's 1): dice is relative to each nucleus' own area, so raising "
        "it weighs a pixel of a small nucleus more than one of a large nucleus, where focal weighs them alike",
    )
    parser.add_argument("--radius", type=float, default=12.0)
    parser.add_argument("--val-every", type=int, default=1)
    parser.add_argument(
        "--window",
        type=int,
        default=0,
        help="refinement window (px) to train and serve with (0: the config's or --init's)",
    )
    parser.add_argument(
        "--select",
        default="",
        help="validation metric that picks best.pt (default: bpq with --stage1, else bpq_gt_prompts)",
    )
    args = parser.parse_args(argv)

    device, out, log = common.start_run(args)

    try:
        overrides = {}
        if args.conv_stem:
            try:
                overrides["image_encoder__conv_stem"] = tuple(int(c) for c in args.conv_stem.split(","))
            except ValueError:
                sys.exit(f"--conv-stem: expected comma-separated channel counts, got {args.conv_stem!r}")
        model = build_cfr_sam(
            args.config if not args.init else None,
            checkpoint=common.read_init(args.init) if args.init else None,
            sam_checkpoint=args.sam_checkpoint,
            seed=args.seed,
            **overrides,
        )
        stage1_info = None
        if args.stage1:
            stage1 = common.read_init(args.stage1)  # a checkpoint or a bundle directory
            state = {k: v for k, v in stage1["model"].items() if k.startswith("prompt_learner.")}
            if not state:
                sys.exit(f"{args.stage1} holds no prompt learner weights")
            model.prompt_learner.load_state_dict({k[len("prompt_learner.") :]: v for k, v in state.items()})
            stage1_info = {
                "checkpoint": str(args.stage1),
                "training": stage1.get("training"),
                "metrics": stage1.get("metrics"),
            }
        if args.window:
            # The per-prompt layers are local, so a trained model can move to another window; the
            # window is part of the saved config, hence of the exported graphs.
            model.config.bgmr.window = args.window
            model.config.validate()
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        sys.exit(str(e))
    configure_trainable(model, model.backbone_pretrained)
    for p in model.prompt_learner.parameters():
        p.requires_grad_(False)
    frozen = [prefix.strip() for prefix in args.freeze.split(",") if prefix.strip()]
    names = [name for name, _ in model.named_parameters()]

    def is_frozen(name: str, prefix: str) -> bool:
        # A module prefix or one parameter's exact name (e.g. image_encoder.pos_embed).
        return name == prefix or name.startswith(prefix + ".")

    unknown = [prefix for prefix in frozen if not any(is_frozen(name, prefix) for name in names)]
    if unknown:
        sys.exit(f"--freeze: no parameters under {', '.join(unknown)}")
    for name, p in model.named_parameters():
        if any(is_frozen(name, prefix) for prefix in frozen):
            p.requires_grad_(False)
    model.to(device)
    if args.bf16:
        common.make_autocast_safe(model)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    size = model.config.input_size
    train_set, val_set = common.build_datasets(args, model.config.class_names, size)
    loader = common.make_loader(train_set, args.batch_size, True, args.workers, args.seed, collate_nuclei)

    params = [p for p in model.parameters() if p.requires_grad]
    print(
        f"trainable parameters: {sum(p.numel() for p in params) / 1e6:.2f}M "
        f"({'PEFT, frozen backbone' if model.backbone_pretrained else 'full training'})",
        file=sys.stderr,
    )
    optimizer, scheduler, steps_per_epoch = common.make_optimizer(params, args, len(loader))

    # Without a trained prompt learner the whole-pipeline numbers are noise; ground-truth prompts
    # then measure what this stage learns.
    select = args.select or ("bpq" if args.stage1 else "bpq_gt_prompts")
    start_epoch, best = 1, {select: -1.0}
    state = None
    if args.resume and (out / "last.pt").exists():
        state = common.load_training_state(out / "last.pt", model, optimizer, scheduler)
        start_epoch, best = state["epoch"] + 1, state["best"]
        print(f"resumed from {out / 'last.pt'} at epoch {start_epoch}", file=sys.stderr)
    ema = common.make_weight_average(model, args, state)
    log.write(
        {
            "event": "start",
            "stage": 2,
            "args": vars(args),
            "train_images": len(train_set),
            "val_images": len(val_set) if val_set else 0,
            "device": str(device),
            "trainable": sum(p.numel() for p in params),
        }
    )

    def begin_epoch(epoch):
        model.train()
        model.prompt_learner.eval()
        if getattr(model, "point_refiner", None) is not None:
            model.point_refiner.eval()  # fixed here; served_prompts runs it as the prompter does
        # Prompt sampling is a function of (seed, epoch) too: a resumed run is exact.
        return np.random.default_rng(args.seed * 1000 + epoch)

    def loss_of_batch(batch, rng):
        coords, labels, targets, valid = sample_prompts(
            batch,
            args.max_prompts,
            args.jitter,
            size,
            rng,
            off_nucleus=args.jitter_off_nucleus,
            interior=args.interior_prompts,
            negatives=args.negatives,
            negative_radius=args.negative_radius,
        )
        if args.served_prompts > 0:
            # Served points replace the sampled prompts of the images served_prompts chose.
            for i, (points, masks) in served_prompts(
                model,
                batch,
                args.max_prompts,
                size,
                rng,
                args.served_prompts,
                args.min_foreground,
                args.nms_radius,
                args.radius,
                args.served_false_points,
                device,
            ).items():
                n = len(points)
                coords[i], labels[i], targets[i], valid[i] = 0.0, -1.0, 0.0, False
                coords[i, :n, 0], labels[i, :n, 0], targets[i, :n], valid[i, :n] = points, 1.0, masks, True
        if not valid.any():
            return None
        image = batch["image"].to(device)
        if args.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        b, p = valid.shape
        flat_valid = valid.reshape(-1)
        image_index = torch.arange(b).repeat_interleave(p)[flat_valid].to(device)
        with common.autocast(device, args.bf16):
            prepared = model.prepare(model.encode(image), image)
            mask_logits, origin, iou, coarse, boundary = model.decode_prompts(
                *prepared,
                coords.reshape(b * p, -1, 2)[flat_valid].to(device),
                labels.reshape(b * p, -1)[flat_valid].to(device),
                image_index=image_index,
            )
        mask_logits, iou, coarse, boundary = common.to_float((mask_logits, iou, coarse, boundary))
        return cfr_sam_loss(
            coarse,
            mask_logits,
            boundary,
            targets.reshape(b * p, size, size)[flat_valid].to(device),
            iou,
            lambda_b=args.lambda_b,
            window_origin=origin,
            focal_weight=args.focal_weight,
            dice_weight=args.dice_weight,
        )

    def validate_epoch(epoch):
        if val_set is None or not (epoch % args.val_every == 0 or epoch == args.epochs):
            return {}
        model.eval()
        return validate(
            model,
            val_set,
            device,
            args.val_limit,
            args.radius,
            pipeline=bool(args.stage1),
            min_foreground=args.min_foreground,
            nms_radius=args.nms_radius,
            negatives=args.negatives,
            negative_radius=args.negative_radius,
        )

    def save_best(epoch, val):
        save_checkpoint(
            out / "best.pt",
            model.cpu(),
            training={
                "stage1": stage1_info,
                "stage2": {"epoch": epoch, "args": vars(args), "log": str(out / "log.jsonl")},
            },
            metrics={"validation": val, "split": f"CoNSeP sources {args.val_sources} held out"},
        )
        model.to(device)

    best = common.run_epochs(
        stage=2,
        args=args,
        out=out,
        log=log,
        loader=loader,
        steps_per_epoch=steps_per_epoch,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        model=model,
        start_epoch=start_epoch,
        best=best,
        select=select,
        begin_epoch=begin_epoch,
        loss_of_batch=loss_of_batch,
        validate=validate_epoch,
        save_best=save_best,
        ema=ema,
    )
    log.write({"event": "end", "stage": 2, "best": best})
    print(f"best: {best}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
