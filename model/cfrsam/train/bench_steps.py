"""Seconds per training step of either stage, float32 against bfloat16 autocast (and channels-last).

    python -m cfrsam.train.bench_steps --stage 1 --init ../models/tiny --threads 2 --steps 6

Same initial weights, same batches (real data, the training loader's augmentation with a fixed
seed) and the same optimiser for every variant, so the per-step losses are comparable: bf16 should
follow the float32 curve to within noise. Prints one line per variant and a JSON summary.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import numpy as np
import torch

from ..build import build_cfr_sam
from ..data import collate_nuclei
from ..losses import cfr_sam_loss
from ..prompt_learner import PromptLearnerLoss
from . import common
from .stage2 import sample_prompts


def run_variant(
    model, batches, stage: int, bf16: bool, channels_last: bool, lr: float, warmup: int, max_prompts: int, device
) -> dict:
    model = copy.deepcopy(model).to(device)
    if stage == 1:
        module = model.prompt_learner
        params = list(module.parameters())
        criterion = PromptLearnerLoss()
    else:
        module = model
        params = [p for n, p in model.named_parameters() if not n.startswith("prompt_learner.")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if bf16:
        common.make_autocast_safe(model)
    module.train()
    if stage == 2:
        model.prompt_learner.eval()
    optimizer = torch.optim.AdamW(params, lr=lr)
    size = model.config.input_size
    rng = np.random.default_rng(0)
    losses, times = [], []
    for i, batch in enumerate(batches):
        started = time.perf_counter()
        image = batch["image"].to(device)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with common.autocast(device, bf16):
            if stage == 1:
                outputs = module(image)
            else:
                coords, labels, targets, valid = sample_prompts(batch, max_prompts, 1.5, size, rng)
                coords, labels, targets = coords.to(device), labels.to(device), targets.to(device)
                b, p = valid.shape
                flat = valid.reshape(-1).to(device)
                index = torch.arange(b, device=device).repeat_interleave(p)[flat]
                prepared = model.prepare(model.encode(image), image)
                outputs = model.decode_prompts(
                    *prepared, coords.reshape(b * p, 1, 2)[flat], labels.reshape(b * p, 1)[flat], image_index=index
                )
        outputs = common.to_float(outputs)
        if stage == 1:
            loss = criterion(
                outputs,
                {"centroids": batch["centroids"], "classes": batch["classes"], "foreground": batch["foreground"]},
            )
        else:
            mask_logits, origin, iou, coarse, boundary = outputs
            loss = cfr_sam_loss(
                coarse, mask_logits, boundary, targets.reshape(b * p, size, size)[flat], iou, window_origin=origin
            )
        optimizer.zero_grad(set_to_none=True)
        loss["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        times.append(time.perf_counter() - started)
        losses.append(float(loss["loss"]))
    timed = times[warmup:] or times
    return {
        "bf16": bf16,
        "channels_last": channels_last,
        "seconds_per_step": float(np.median(timed)),
        "mean_seconds_per_step": float(np.mean(timed)),
        "losses": losses,
    }


def print_profile(model, batches, args, device) -> None:
    """The first variant's steps under torch.profiler: the top ops by own CPU time (and GPU time)."""
    from torch.profiler import ProfilerActivity, profile

    name = args.variants.split(",")[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    torch.manual_seed(0)
    with profile(activities=activities) as prof:
        run_variant(model, batches, args.stage, "bf16" in name, "+cl" in name, args.lr, 0, args.max_prompts, device)
    averages = prof.key_averages()
    print(f"profile of {name}, {len(batches)} steps, by own CPU time:", file=sys.stderr)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
    if device.type == "cuda":
        print(f"profile of {name}, by own GPU time:", file=sys.stderr)
        print(averages.table(sort_by="self_cuda_time_total", row_limit=10), file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--init", default=None, help="checkpoint or bundle directory (default: random tiny)")
    parser.add_argument("--data", default=str(common.default_data_root()))
    parser.add_argument("--sets", default="consep-train")
    parser.add_argument("--val-sources", default=",".join(map(str, common.DEFAULT_VAL_SOURCES)))
    parser.add_argument("--batch-size", type=int, default=0, help="default 4 (stage 1) or 2 (stage 2)")
    parser.add_argument("--max-prompts", type=int, default=12)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default="fp32,bf16,bf16+cl,fp32+cl")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run the first variant under torch.profiler and print the ops that take the time",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    torch.manual_seed(0)
    model = build_cfr_sam(None if args.init else "tiny", checkpoint=common.read_init(args.init) if args.init else None)
    ns = argparse.Namespace(data=args.data, sets=args.sets, val_sources=args.val_sources, val_limit=0)
    train, _ = common.build_datasets(ns, model.config.class_names, model.config.input_size)
    batch_size = args.batch_size or (4 if args.stage == 1 else 2)
    loader = common.make_loader(train, batch_size, True, 0, 0, collate_nuclei)
    batches = []
    started = time.perf_counter()
    for batch in loader:
        batches.append(batch)
        if len(batches) == args.steps:
            break
    # The loader's own cost (augmentation, targets; one process): a GPU step faster than this
    # starves without enough DataLoader workers.
    print(
        f"loader: {(time.perf_counter() - started) / max(len(batches), 1):.3f} s/batch of {batch_size} in one process",
        file=sys.stderr,
    )
    results = []
    for name in args.variants.split(","):
        torch.manual_seed(0)
        r = run_variant(
            model, batches, args.stage, "bf16" in name, "+cl" in name, args.lr, args.warmup, args.max_prompts, device
        )
        r["variant"] = name
        results.append(r)
        print(
            f"stage {args.stage} {name:8s} threads {torch.get_num_threads()}: "
            f"{r['seconds_per_step']:.3f} s/step (median of {max(len(batches) - args.warmup, 1)}), "
            f"losses " + " ".join(f"{x:.4f}" for x in r["losses"]),
            file=sys.stderr,
            flush=True,
        )
    if args.profile:
        print_profile(model, batches, args, device)
    print(
        json.dumps(
            {"stage": args.stage, "threads": torch.get_num_threads(), "batch_size": batch_size, "results": results}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
