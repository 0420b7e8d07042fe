"""`python -m cfrsam.export`: export a bundle or check one (see the package docstring)."""

import argparse
import math
import os
import sys
from typing import Optional, Sequence, Tuple

import torch

from ..build import build_cfr_sam
from ..checkpoint import CheckpointError, read_checkpoint
from ..configs import CONFIG_NAMES, ConfigError
from . import __doc__ as package_doc
from .bundle import bundle_checkpoint, check_bundle, export_bundle
from .errors import ExportError
from .manifest import prompter_settings


def _bundle_size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)


def with_serving_settings(
    ckpt,
    min_score: Optional[float],
    class_weight: Optional[float],
    mask_threshold: Optional[float] = None,
    min_foreground: Optional[float] = None,
    nms_radius: Optional[float] = None,
    blur_gate: Optional[Tuple[float, float]] = None,
):
    """The checkpoint with serving settings replaced (None: kept): the point refiner's score bar,
    its blur gate (sharpness cut, the bar below it) and class weight, the decoder's mask threshold,
    and the prompter's foreground threshold and NMS radius. They change what is served, so the
    recorded validation no longer applies: it is kept under `validation_before_settings` beside
    the settings it was measured with."""
    if all(v is None for v in (min_score, class_weight, mask_threshold, min_foreground, nms_radius, blur_gate)):
        return ckpt
    if min_foreground is not None and not 0 < min_foreground < 1:
        raise ExportError(f"--min-foreground {min_foreground}: needs a foreground probability in (0, 1)")
    if nms_radius is not None and not (math.isfinite(nms_radius) and nms_radius > 0):
        raise ExportError(f"--nms-radius {nms_radius}: needs a radius in pixels > 0")
    if ckpt is None and (min_foreground is not None or nms_radius is not None):
        raise ExportError("--min-foreground / --nms-radius: need a --checkpoint (a fresh model has no tuned prompter)")
    if mask_threshold is not None and not math.isfinite(mask_threshold):
        raise ExportError(f"--mask-threshold {mask_threshold}: needs a finite logit")
    if ckpt is None and mask_threshold is not None and min_score is None and class_weight is None:
        return ckpt  # a fresh model: build_cfr_sam takes the threshold, and there is no validation
    config = dict((ckpt or {}).get("config") or {})
    settings = {}
    if min_score is not None or class_weight is not None or blur_gate is not None:
        refiner = config.get("point_refiner")
        if not refiner:
            raise ExportError(
                "--min-point-score / --refiner-class-weight / --blur-gate: the checkpoint has no point refiner"
            )
        if min_score is not None and not (refiner.get("score_head") and 0 <= min_score <= 1):
            raise ExportError(f"--min-point-score {min_score}: needs a refiner with a score head and a value in [0, 1]")
        if class_weight is not None and not (refiner.get("num_classes") and 0 <= class_weight <= 1):
            raise ExportError(
                f"--refiner-class-weight {class_weight}: needs a refiner with a class head and a value in [0, 1]"
            )
        if blur_gate is not None:
            cut, bar = blur_gate
            if not (refiner.get("score_head") and math.isfinite(cut) and cut > 0 and 0 <= bar <= 1):
                raise ExportError(
                    f"--blur-gate {cut},{bar}: needs a refiner with a score head, a sharpness cut > 0 and a bar in [0, 1]"
                )
        settings.update(min_score=refiner.get("min_score", 0.0), class_weight=refiner.get("class_weight", 0.0))
        if blur_gate is not None:
            settings.update(
                blur_gate=refiner.get("blur_gate", 0.0), blurred_min_score=refiner.get("blurred_min_score", 0.0)
            )
        changed = dict(refiner)
        if min_score is not None:
            changed["min_score"] = min_score
        if class_weight is not None:
            changed["class_weight"] = class_weight
        if blur_gate is not None:
            changed["blur_gate"], changed["blurred_min_score"] = float(blur_gate[0]), float(blur_gate[1])
        config["point_refiner"] = changed
    if mask_threshold is not None:
        settings["mask_threshold"] = config.get("mask_threshold", 0.0)
        config["mask_threshold"] = mask_threshold
    prompter = dict(prompter_settings(ckpt))
    for key, value in (("min_foreground", min_foreground), ("nms_radius", nms_radius)):
        if value is not None:
            settings[key] = prompter[key]
            prompter[key] = float(value)
    metrics = dict(ckpt.get("metrics") or {})
    if "validation" in metrics:
        metrics["validation_before_settings"] = {"settings": settings, **metrics.pop("validation")}
    return {**ckpt, "config": config, "metrics": metrics, "prompter": prompter}


def main(argv: Optional[Sequence[str]] = None) -> int:
    with torch.no_grad():
        return _main(argv)


def _pair(text: str) -> Tuple[float, float]:
    try:
        first, second = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers CUT,BAR, got {text!r}") from None
    return first, second


def _main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cfrsam.export", description=package_doc.split("\n\n")[0])
    p.add_argument("--config", help=f"config name ({', '.join(CONFIG_NAMES)}); default: the checkpoint's")
    p.add_argument("--out", help="bundle directory to write")
    p.add_argument("--checkpoint", help="CFR-SAM checkpoint (ours), or a bundle directory to export again")
    p.add_argument("--sam-checkpoint", help="official SAM checkpoint (sam_vit_*.pth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-size", type=int)
    p.add_argument("--refinement", choices=("window", "full"))
    p.add_argument("--window", type=int)
    p.add_argument(
        "--mask-threshold",
        type=float,
        help="logit above which a mask pixel is set (the decoder service's threshold; default: the checkpoint's)",
    )
    p.add_argument(
        "--min-point-score",
        type=float,
        help="the point refiner's score bar (prompter.min_point_score; default: the checkpoint's)",
    )
    p.add_argument(
        "--blur-gate",
        metavar="CUT,BAR",
        type=_pair,
        help="on tiles whose sharpness is below CUT the refiner's score bar is BAR (prompter.blur_gate; "
        "cfrsam/prompt_learner/sharpness.py; default: the checkpoint's, usually none)",
    )
    p.add_argument(
        "--refiner-class-weight",
        type=float,
        help="weight of the point refiner's classes (prompter.refiner_class_weight; default: the checkpoint's)",
    )
    p.add_argument(
        "--min-foreground",
        type=float,
        help="the prompter's foreground threshold for the learner's points (prompter.min_foreground; default: the checkpoint's)",
    )
    p.add_argument(
        "--nms-radius",
        type=float,
        help="the prompter's point NMS radius in pixels (prompter.nms_radius; default: the checkpoint's)",
    )
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--no-full", action="store_true", help="skip decoder_prompts_full.onnx")
    p.add_argument(
        "--no-weights",
        action="store_true",
        help="omit weights.pt (a random-init bundle is then checked by regenerating from the seed)",
    )
    p.add_argument("--name")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    p.add_argument(
        "--deform-conv",
        choices=("native", "grid-sample"),
        default="native",
        help="BGMR's deformable layers with Cout >= Cin as ONNX DeformConv (opset 19, onnxruntime >= 1.25) "
        "or as GridSample (opset 17, any onnxruntime); default native",
    )
    p.add_argument("--check", metavar="DIR", help="check DIR's parity fixture against PyTorch")
    args = p.parse_args(argv)
    try:
        if args.check:
            failures = check_bundle(args.check)
            if failures:
                print(f"{args.check}: {len(failures)} check(s) failed:", file=sys.stderr)
                for failure in failures:
                    print(f"  {failure}", file=sys.stderr)
                return 1
            print(f"{args.check}: bundle matches PyTorch")
            return 0
        if not args.out:
            raise ExportError("--out DIR is required (or --check DIR)")
        if not args.config and not args.checkpoint:
            raise ExportError("--config is required unless --checkpoint records a config")
        if args.checkpoint and os.path.isdir(args.checkpoint):
            if os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
                raise ExportError("--out must differ from the bundle being exported again")
            ckpt = bundle_checkpoint(args.checkpoint)
        else:
            ckpt = read_checkpoint(args.checkpoint) if args.checkpoint else None
        ckpt = with_serving_settings(
            ckpt,
            args.min_point_score,
            args.refiner_class_weight,
            args.mask_threshold,
            min_foreground=args.min_foreground,
            nms_radius=args.nms_radius,
            blur_gate=args.blur_gate,
        )
        model = build_cfr_sam(
            args.config,
            checkpoint=ckpt,
            sam_checkpoint=args.sam_checkpoint,
            seed=args.seed,
            input_size=args.input_size,
            refinement=args.refinement,
            window=args.window,
            mask_threshold=args.mask_threshold,
        )
        source = {
            "checkpoint": os.path.basename(args.checkpoint) if args.checkpoint else None,
            "sam_checkpoint": os.path.basename(args.sam_checkpoint) if args.sam_checkpoint else None,
        }
        if ckpt and "bundle" in ckpt:
            # Exported again: the weights' origin is the bundle's own source.
            source = {**(ckpt["bundle"]["source"] or {}), "bundle": ckpt["bundle"]["version"]}
        manifest = export_bundle(
            model,
            args.out,
            name=args.name,
            seed=args.seed,
            parity=not args.no_parity,
            precision=args.precision,
            checkpoint_info=ckpt or {},
            include_full=not args.no_full,
            source=source,
            include_weights=not args.no_weights,
            native_deform_conv=args.deform_conv == "native",
        )
        size = _bundle_size(args.out)
        print(f"wrote {args.out}: {manifest['name']} {manifest['version']} ({size / 1e6:.1f} MB)")
        return 0
    except (ExportError, ConfigError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
