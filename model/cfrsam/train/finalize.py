"""Assemble the shipped checkpoint from the two stages, tune the prompter, validate the whole model.

    python -m cfrsam.train.finalize --stage1 runs/stage1/best.pt --stage2 runs/stage2/best.pt --out runs/final.pt

The stages train separately (the point selection between them is not differentiable, paper §4.3),
possibly at the same time, so the final model takes the prompt learner of stage 1 and everything
else of stage 2. The prompter's foreground threshold is then picked on the validation tiles by
detection F1 (or, with `--select det_f1_placed`, by detection F1 within 4 px; it trades precision
for recall and the paper's argmax rule favours precision on a small model), and the whole pipeline is validated with it: bPQ, mPQ, AJI, detection F1. Those
numbers, the threshold and both stages' provenance go into the checkpoint, and from there into the
bundle manifest on export.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from ..build import build_cfr_sam
from ..data import collate_nuclei
from . import common
from .stage1 import add_select_arg
from .stage1 import validate as validate_detection
from .stage2 import validate as validate_pipeline


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", required=True, help="checkpoint or bundle directory: its prompt learner")
    parser.add_argument("--stage2", required=True, help="checkpoint or bundle directory: everything else")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--val-sources", default=",".join(map(str, common.DEFAULT_VAL_SOURCES)))
    parser.add_argument("--val-limit", type=int, default=0)
    parser.add_argument("--thresholds", default="0.2,0.3,0.4,0.5,0.6")
    parser.add_argument(
        "--nms-radii",
        default="4,6,8",
        help="point NMS radii to try (px): anchors converging on one nucleus are duplicates",
    )
    parser.add_argument("--radius", type=float, default=12.0)
    add_select_arg(parser, "the prompter's threshold and NMS radius")
    parser.add_argument(
        "--mask-threshold",
        type=float,
        help="mask logit threshold to serve and validate with (the decoder's; default: stage 2's config)",
    )
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    # Either may be an exported bundle (its weights widened from float16), e.g. the default.
    s1, s2 = common.read_init(args.stage1), common.read_init(args.stage2)
    learner = {k[len("prompt_learner.") :]: v for k, v in s1["model"].items() if k.startswith("prompt_learner.")}
    if not learner:
        sys.exit(f"{args.stage1} holds no prompt learner weights")
    # Stage 1 may have trained another prompt-learner preset (stage1 --prompt-learner): the model
    # takes stage 1's learner config with stage 2's everything else.
    config = {**s2["config"], "prompt_learner": s1["config"]["prompt_learner"]}
    sam_side = {k: v for k, v in s2["model"].items() if not k.startswith("prompt_learner.")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="checkpoint has no prompt learner weights")
        model = build_cfr_sam(None, checkpoint={**s2, "config": config, "model": sam_side})
    model.prompt_learner.load_state_dict(learner)
    model.eval()
    if args.mask_threshold is not None:
        # A serving rule like the prompter's two: part of the config, hence of the bundle's version.
        model.config.mask_threshold = args.mask_threshold

    val_set = common.validation_set(
        args.data, args.val_sources, args.val_limit, model.config.class_names, model.config.input_size
    )
    loader = common.make_loader(val_set, 4, False, 0, 0, collate_nuclei)

    sweep = {}
    for t in [float(x) for x in args.thresholds.split(",")]:
        for r in [float(x) for x in args.nms_radii.split(",")]:
            sweep[(t, r)] = validate_detection(model, loader, torch.device("cpu"), args.radius, t, r)
            print(
                f"min_foreground {t} nms_radius {r}: " + " ".join(f"{k}={v:.4f}" for k, v in sweep[(t, r)].items()),
                file=sys.stderr,
            )
    best_t, best_r = max(sweep, key=lambda key: sweep[key][args.select])

    started = time.time()
    val = validate_pipeline(
        model, val_set, torch.device("cpu"), 0, args.radius, min_foreground=best_t, nms_radius=best_r
    )
    print(
        "validation: "
        + " ".join(f"{k}={v:.4f}" for k, v in val.items() if isinstance(v, float))
        + f" pq_per_class={val.get('pq_per_class')} ({time.time() - started:.0f}s)",
        file=sys.stderr,
    )

    checkpoint = {
        "format": s2.get("format"),
        "config": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "backbone_pretrained": bool(s2.get("backbone_pretrained", False)),
        "training": {
            "stage1": s1.get("training"),
            "stage2": s2.get("training"),
            "stage1_checkpoint": args.stage1,
            "stage2_checkpoint": args.stage2,
        },
        "metrics": {
            "validation": val,
            "prompter_sweep": {f"min_foreground={t},nms_radius={r}": v for (t, r), v in sweep.items()},
            "split": f"CoNSeP sources {args.val_sources} held out ({len(val_set)} tiles)",
        },
        "prompter": {"min_foreground": best_t, "nms_radius": best_r},
    }
    torch.save(checkpoint, args.out)
    print(f"wrote {args.out} (min_foreground {best_t}, nms_radius {best_r})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
