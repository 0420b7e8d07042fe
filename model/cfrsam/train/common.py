"""What both training stages share: seeds, devices, datasets, checkpoints with exact resume, logs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from ..data import NucleiDataset
from ..data.augment import AugmentConfig
from ..data.dataset import default_data_root, list_samples
from ..data.scale import load_estimates
from ..data.stain import lab_stats
from .ema import WeightAverage

# CoNSeP tiles come from 27 source images; these five are held out for validation (split by source,
# never by tile, or neighbouring tiles leak into validation).
DEFAULT_VAL_SOURCES = (3, 9, 15, 21, 27)
# Sets beside CoNSeP: their nuclei have no class in CoNSeP's taxonomy (UNKNOWN_CLASS), so they
# teach where nuclei are and what they look like, not which class they are.
EXTRA_SETS = ("monuseg-train", "cpm15", "nucls/train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=str(default_data_root()), help="data root (layout of ../shared/data)")
    parser.add_argument("--config", default="tiny", help="model config name (tiny, b, h)")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument(
        "--sets",
        default="consep-train," + ",".join(EXTRA_SETS),
        help="comma-separated set directories under --data; CoNSeP is split by source",
    )
    parser.add_argument("--val-sources", default=",".join(map(str, DEFAULT_VAL_SOURCES)))
    parser.add_argument(
        "--repeat",
        default="",
        help="SET=K,...: draw each image of SET K times per epoch (e.g. monuseg-train=6: its 1000 px "
        "images give one 256 px crop per draw, so unrepeated they are 3 %% of the samples)",
    )
    parser.add_argument(
        "--hold-out",
        default="",
        help="SET=N,...: leave the last N images (by name) of SET out of training, for a held-out "
        "evaluation of that set (`cfrsam evaluate` on a folder of them)",
    )
    parser.add_argument("--val-limit", type=int, default=0, help="validate on at most N tiles (0: all)")
    parser.add_argument("--min-foreground", type=float, default=0.5, help="prompter threshold for validation")
    parser.add_argument("--nms-radius", type=float, default=4.0, help="prompter NMS radius (px) for validation")
    parser.add_argument("--steps-per-epoch", type=int, default=0, help="cap steps per epoch (0: whole set)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=0,
        help="stop after the epoch that passes this many minutes (resume with --resume: the same schedule)",
    )
    parser.add_argument(
        "--fit-to-budget",
        action="store_true",
        help="after the first epoch, shorten --epochs to what fits --time-budget and end the cosine "
        "schedule there (for a machine whose epoch time is not known in advance, e.g. a GPU run)",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="keep an exponential moving average of the weights with this decay per step (e.g. 0.999): "
        "validation scores it (the raw weights too, as val_raw_*) and best.pt holds it; 0: off",
    )
    add_sampling_args(parser)
    parser.add_argument(
        "--init",
        help="start from this CFR-SAM checkpoint's weights, or a bundle directory "
        "(its weights.pt); a new schedule, not a resume",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast for the forward pass (CPU or CUDA); losses, optimiser and " "weights stay float32",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="channels-last memory format for the convolutional parts and the input",
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The scale training samples are drawn at: shared by the stages and the point refiner."""
    parser.add_argument(
        "--target-mpp",
        type=float,
        default=0.0,
        help="resample training samples to this many um/px: those whose JSON gives an mpp, and those "
        "cfrsam/data/estimated_mpp.json estimates (CPM-15's 20x images; python -m cfrsam.data.scale) (0: off)",
    )
    parser.add_argument(
        "--scale-range",
        default=",".join(f"{v:g}" for v in AugmentConfig().scale_range),
        help="LO,HI: the zoom of the training crops, drawn uniformly from [LO, HI] (1: none; applied "
        "after --target-mpp): nuclei seen at LO..HI times their size at the model's scale",
    )
    parser.add_argument(
        "--stain-transfer",
        type=float,
        default=0.0,
        help="probability that a training crop takes the Lab stain statistics of another training "
        "image, drawn from a random set (RandStainNA; cfrsam/data/stain.py) (0: off)",
    )
    parser.add_argument(
        "--blur",
        type=float,
        default=0.0,
        help="probability that a training crop is blurred as an out-of-focus scan is: a Gaussian of "
        "sigma drawn from --blur-sigma, in pixels at the model's scale (0: off)",
    )
    parser.add_argument(
        "--blur-sigma",
        default=",".join(f"{v:g}" for v in AugmentConfig().blur_sigma),
        help="LO,HI: the range of --blur's sigma in pixels",
    )


def add_analysis_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the analyses that run a model on the validation tiles at the served setting."""
    parser.add_argument("--checkpoint", required=True, help="a CFR-SAM checkpoint or an exported bundle directory")
    parser.add_argument("--data", default=None)
    parser.add_argument("--val-sources", default=",".join(map(str, DEFAULT_VAL_SOURCES)))
    parser.add_argument("--val-limit", type=int, default=0)
    parser.add_argument("--min-foreground", type=float, default=0.3, help="prompter threshold (the served one)")
    parser.add_argument("--nms-radius", type=float, default=12.0, help="prompter NMS radius (px, the served one)")
    parser.add_argument("--radius", type=float, default=12.0, help="detection pairing radius (px)")


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on `device` when enabled (a no-op context otherwise)."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _float_input(module, inputs):
    return tuple(x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x for x in inputs)


def make_autocast_safe(model: torch.nn.Module) -> List[Any]:
    """Let nn.LayerNorm / nn.GroupNorm take bfloat16 activations under CPU autocast.

    torch 1.13's CPU autocast leaves layer_norm out of its cast lists, so a bfloat16 input meets
    float32 weights and fails; a forward pre-hook widens such inputs to float32 (normalisation in
    float32 is what autocast does on CUDA anyway). Hooks only: the modules and the exported graphs
    are unchanged. Returns the hook handles."""
    handles = []
    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            handles.append(module.register_forward_pre_hook(_float_input))
    return handles


def to_float(value):
    """Cast floating tensors in a (nested) output to float32, so losses are computed in float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: to_float(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float(v) for v in value)
    return value


def read_init(path: str) -> Dict[str, Any]:
    """A CFR-SAM checkpoint dict from a checkpoint file or an exported bundle directory.

    A bundle's weights.pt holds the (float16-rounded) state dict of the merged model and its
    manifest the config; the weights are widened to float32 to train on."""
    if Path(path).is_dir():
        from ..export import ExportError, bundle_checkpoint

        try:
            checkpoint = bundle_checkpoint(path)
        except ExportError as e:
            raise ValueError(str(e)) from e
        # A new run records where it started, not the bundle's own training history.
        return {**checkpoint, "training": {"bundle": str(path), "version": checkpoint["bundle"]["version"]}}
    from ..checkpoint import read_checkpoint

    return read_checkpoint(path)


def class_map(class_names: Sequence[str]) -> Dict[str, int]:
    return {name: i for i, name in enumerate(class_names)}


def parse_set_counts(spec: str, flag: str, minimum: int) -> Dict[str, int]:
    """ "monuseg-train=6,cpm15=2" -> {"monuseg-train": 6, "cpm15": 2}."""
    counts: Dict[str, int] = {}
    for part in [p for p in spec.split(",") if p]:
        name, _, value = part.partition("=")
        try:
            counts[name] = int(value)
        except ValueError:
            sys.exit(f"{flag}: expected SET=INTEGER, got {part!r}")
        if counts[name] < minimum:
            sys.exit(f"{flag}: {name} must be at least {minimum}, got {counts[name]}")
    return counts


def parse_range(text: str, flag: str, example: str) -> Tuple[float, float]:
    """A flag's "LO,HI" -> (LO, HI), 0 < LO <= HI."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        sys.exit(f"{flag}: expected LO,HI (e.g. {example}), got {text!r}")
    if not 0 < lo <= hi:
        sys.exit(f"{flag}: need 0 < LO <= HI, got {text!r}")
    return lo, hi


def parse_scale_range(text: str) -> Tuple[float, float]:
    """--scale-range "LO,HI": the crops' zoom."""
    return parse_range(text, "--scale-range", "0.9,1.1")


def stain_bank(parts) -> tuple:
    """The Lab stain statistics of every distinct training image, one tuple per set."""
    bank = []
    for part in parts:
        bank.append(tuple(lab_stats(part.load(name)[0]) for name in dict.fromkeys(part.names)))
    return tuple(bank)


def build_datasets(args, class_names: Sequence[str], size: int):
    """(train, val) datasets; validation is the held-out CoNSeP sources, centre crops, no augment."""
    root = Path(args.data)
    if not root.is_dir():
        sys.exit(f"data directory {root} not found (pass --data)")
    val_sources = [int(s) for s in args.val_sources.split(",") if s]
    cmap = class_map(class_names)
    repeat = parse_set_counts(getattr(args, "repeat", ""), "--repeat", minimum=1)
    holdout = parse_set_counts(getattr(args, "hold_out", ""), "--hold-out", minimum=0)
    train_parts, val = [], None
    set_names = [s for s in args.sets.split(",") if s]
    # Namespaces built by hand (validation_set, tests) may have no --scale-range: the default zoom.
    scale_range = getattr(args, "scale_range", None)
    augment = AugmentConfig(scale_range=parse_scale_range(scale_range)) if scale_range else AugmentConfig()
    stain_transfer = getattr(args, "stain_transfer", 0.0)
    if not 0 <= stain_transfer <= 1:
        sys.exit(f"--stain-transfer: a probability in [0, 1], got {stain_transfer}")
    blur = getattr(args, "blur", 0.0)
    if not 0 <= blur <= 1:
        sys.exit(f"--blur: a probability in [0, 1], got {blur}")
    if blur > 0:
        # Namespaces built by hand may have no --blur-sigma: AugmentConfig's range.
        sigma = getattr(args, "blur_sigma", None)
        augment = dataclasses.replace(augment, blur_prob=blur)
        if sigma:
            augment = dataclasses.replace(augment, blur_sigma=parse_range(sigma, "--blur-sigma", "0.5,2"))
    for name in set(repeat) | set(holdout):
        if name not in set_names or name.startswith("consep"):
            sys.exit(f"--repeat/--hold-out name a non-CoNSeP set of --sets ({', '.join(set_names)}), got {name!r}")
    for set_name in set_names:
        set_dir = root / set_name
        if not set_dir.is_dir():
            sys.exit(f"set {set_name!r} not found under {root}")
        if set_name.startswith("consep"):
            train_parts.append(
                NucleiDataset(
                    set_dir,
                    size=size,
                    augment=augment,
                    split="train",
                    val_sources=val_sources,
                    class_map=cmap,
                    cache=True,
                )
            )
            val = NucleiDataset(
                set_dir,
                size=size,
                augment=False,
                split="val",
                val_sources=val_sources,
                class_map=cmap,
                crop="center",
                cache=True,
            )
        else:
            names = list_samples(set_dir)
            held_out = holdout.get(set_name, 0)
            if held_out >= len(names):
                sys.exit(f"--hold-out {set_name}={held_out} leaves no image of its {len(names)} to train on")
            if held_out:
                print(f"{set_name}: held out of training: {', '.join(names[len(names) - held_out:])}", file=sys.stderr)
            names = names[: len(names) - held_out]
            train_parts.append(
                NucleiDataset(
                    set_dir,
                    names=names * repeat.get(set_name, 1),
                    size=size,
                    augment=augment,
                    class_map=cmap,
                    cache=True,
                    target_mpp=getattr(args, "target_mpp", 0) or None,
                    mpp_estimates=load_estimates() if getattr(args, "target_mpp", 0) else None,
                )
            )
    if not train_parts:
        sys.exit("no training sets selected")
    if stain_transfer > 0:
        bank = stain_bank(train_parts)
        print(f"stain transfer: {sum(map(len, bank))} training images in {len(bank)} sets", file=sys.stderr)
        for part in train_parts:
            part.augment = dataclasses.replace(part.augment, stain_transfer_prob=stain_transfer, stain_bank=bank)
    train = ConcatDataset(train_parts) if len(train_parts) > 1 else train_parts[0]
    if val is not None and args.val_limit:
        val.names = val.names[: args.val_limit]
    return train, val


def validation_set(data: Optional[str], val_sources: str, val_limit: int, class_names: Sequence[str], size: int):
    """The held-out CoNSeP tiles the training commands validate on, for the commands that only validate."""
    ns = argparse.Namespace(
        data=data or str(default_data_root()), sets="consep-train", val_sources=val_sources, val_limit=val_limit
    )
    return build_datasets(ns, class_names, size)[1]


def make_loader(dataset, batch_size: int, shuffle: bool, workers: int, seed: int, collate):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        drop_last=shuffle,
    )


def make_optimizer(params, args, batches_per_epoch: int, warmup_steps: int = 50):
    """AdamW with a linear warm-up and a cosine decay over the whole run.

    Returns (optimizer, scheduler stepped once per batch, steps per epoch)."""
    steps_per_epoch = batches_per_epoch if not args.steps_per_epoch else min(args.steps_per_epoch, batches_per_epoch)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    schedule = WarmupCosine(warmup_steps, steps_per_epoch * args.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler, steps_per_epoch


class WarmupCosine:
    """The LR factor at step s: linear warm-up, then cosine decay to 0 at `total` steps.

    An object rather than a lambda so that `total` can be refitted to a time budget after the first
    epoch (see `run_epochs`) and LambdaLR's state_dict keeps it, so a resumed run decays the same."""

    def __init__(self, warmup_steps: int, total: int):
        self.warmup_steps = warmup_steps
        self.total = max(1, total)

    def __call__(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps)
        return warmup * 0.5 * (1 + math.cos(math.pi * min(step, self.total) / self.total))


def epochs_within_budget(budget_minutes: float, first_epoch_seconds: float, requested: int, done: int) -> int:
    """How many epochs fit a time budget, judged by the first epoch (training + validation + save).

    Never fewer than already done, never more than requested: `--epochs` stays the upper bound."""
    fitting = int(budget_minutes * 60 // max(first_epoch_seconds, 1e-6))
    return max(done, min(requested, fitting))


def start_run(args) -> Tuple[torch.device, Path, "RunLog"]:
    """A training run's start, the same for both stages: seeded, threads set, the device picked, the
    output folder made and its JSON-lines log opened."""
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return pick_device(args.device), out, RunLog(out / "log.jsonl")


class RunLog:
    """Append-only JSON-lines log (one record per step summary and per epoch), easy to plot."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    path: Path, model, optimizer, scheduler, epoch: int, best: Dict[str, Any], extra: Optional[Dict[str, Any]] = None
) -> None:
    """Everything needed to resume exactly: weights, optimiser, scheduler, RNGs, epoch."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "config": model.config.to_dict(),
            "backbone_pretrained": bool(getattr(model, "backbone_pretrained", False)),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": epoch,
            "best": best,
            "rng": rng_state(),
            "extra": extra or {},
        },
        tmp,
    )
    os.replace(tmp, path)


def load_training_state(path: Path, model, optimizer, scheduler) -> Dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def make_weight_average(
    model: torch.nn.Module, args, state: Optional[Dict[str, Any]] = None
) -> Optional[WeightAverage]:
    """The `--ema` average (None without it), continued from last.pt's when resuming."""
    if not getattr(args, "ema", 0.0):
        return None
    ema = WeightAverage(model, args.ema)
    if state is not None and "ema" in (state.get("extra") or {}):
        ema.load_state_dict(state["extra"]["ema"])
    return ema


def progress(epoch: int, epochs: int, step: int, steps: int, started: float, losses: Dict[str, float]) -> None:
    elapsed = time.time() - started
    rate = step / elapsed if elapsed > 0 else 0.0
    eta = (steps - step) / rate if rate > 0 else 0.0
    parts = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
    print(
        f"epoch {epoch}/{epochs} step {step}/{steps} {rate:.2f} it/s eta {eta:.0f}s {parts}",
        file=sys.stderr,
        flush=True,
    )


def mean_dict(records: List[Dict[str, float]]) -> Dict[str, float]:
    keys = records[0].keys() if records else []
    return {k: float(np.mean([r[k] for r in records])) for k in keys}


def run_epochs(
    *,
    stage: int,
    args,
    out: Path,
    log: "RunLog",
    loader,
    steps_per_epoch: int,
    params: List[torch.nn.Parameter],
    optimizer,
    scheduler,
    model: torch.nn.Module,
    start_epoch: int,
    best: Dict[str, Any],
    select: str,
    begin_epoch,
    loss_of_batch,
    validate,
    save_best,
    auxiliary: Optional[torch.nn.Module] = None,
    ema: Optional[WeightAverage] = None,
) -> Dict[str, Any]:
    """The epoch loop both stages share; returns the best validation record.

    begin_epoch(epoch) sets train/eval modes and returns the epoch's context (e.g. its generator);
    loss_of_batch(batch, context) returns the loss dict ("loss" is minimised) or None to skip the
    batch; validate(epoch) returns the validation metrics ({} when this epoch is not validated);
    save_best(epoch, metrics) writes best.pt. The shuffle order is a function of (seed, epoch), so a
    resumed run sees the same batches. After each epoch: log line, best.pt when `select` improves,
    last.pt (exact resume), and the time budget check. `auxiliary` is a training-only module
    (e.g. stage 1's domain classifier) whose state last.pt keeps beside the model's. With `ema`
    the average follows every step; validation scores the raw weights (logged as val_raw_*) and
    then the average, which `select` and best.pt use; last.pt keeps both.
    """
    began = time.time()
    epoch = start_epoch - 1
    while epoch < args.epochs:
        epoch += 1
        loader.generator.manual_seed(args.seed * 1000 + epoch)
        context = begin_epoch(epoch)
        started, records = time.time(), []
        for step, batch in enumerate(loader, 1):
            if step > steps_per_epoch:
                break
            losses = loss_of_batch(batch, context)
            if losses is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            records.append({k: float(v) for k, v in losses.items() if k != "num_matched"})
            if step % 10 == 0 or step == steps_per_epoch:
                progress(epoch, args.epochs, step, steps_per_epoch, started, mean_dict(records[-10:]))
        raw = validate(epoch) if ema is not None else {}
        averaged = ema.applied(model) if ema is not None else nullcontext()
        with averaged:
            val = validate(epoch)
            if val and val[select] > best.get(select, -1.0):
                best = {"epoch": epoch, **val}
                save_best(epoch, val)
        record = {
            "event": "epoch",
            "stage": stage,
            "epoch": epoch,
            "lr": scheduler.get_last_lr()[0],
            "seconds": time.time() - started,
            **{f"train_{k}": v for k, v in mean_dict(records).items()},
            **{f"val_{k}": v for k, v in val.items()},
            **{f"val_raw_{k}": v for k, v in raw.items()},
        }
        log.write(record)
        print(
            f"epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float)),
            file=sys.stderr,
            flush=True,
        )
        extra: Dict[str, Any] = {}
        if auxiliary is not None:
            extra["auxiliary"] = auxiliary.state_dict()
        if ema is not None:
            extra["ema"] = ema.state_dict()
        fit = getattr(args, "fit_to_budget", False) and args.time_budget
        if fit and epoch == start_epoch and isinstance(scheduler.lr_lambdas[0], WarmupCosine):
            # A schedule cut off by the budget would stop at a high learning rate. Opt-in: without
            # it, a run stopped by its budget and resumed follows exactly the uninterrupted schedule.
            fitted = epochs_within_budget(args.time_budget, time.time() - began, args.epochs, epoch)
            if fitted != args.epochs:
                print(f"time budget of {args.time_budget} min: schedule fitted to {fitted} epochs", file=sys.stderr)
                args.epochs = fitted
                scheduler.lr_lambdas[0].total = max(1, steps_per_epoch * fitted)
        save_training_state(out / "last.pt", model, optimizer, scheduler, epoch, best, extra)
        if args.time_budget and (time.time() - began) / 60 > args.time_budget:
            print(f"time budget of {args.time_budget} min reached after epoch {epoch}", file=sys.stderr)
            break
    return best
