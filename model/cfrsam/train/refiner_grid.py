"""The whole pipeline's validation (as finalize records it) at several serving settings of a model
with a point refiner: the prompter's threshold, the score head's bar and the class weight.

    python -m cfrsam.train.refiner_grid --checkpoint ../runs/final-refined.pt \
        --settings "0.3,0.6,0.25;0.25,0.6,0.25;0.3,0.6,0" [--json grid.jsonl]

Each setting is `min_foreground,min_score,class_weight[,blur_gate,blurred_min_score]`: the blur
gate's cut and bar (0,0 turns it off), the model's own when left out; the prompter's NMS radius
stays at --nms-radius. One JSON line per setting: bPQ, AJI, mPQ, detection F1 / precision / recall, type
accuracy on the validation tiles (PyTorch, the serving rules of `inference.segment_tile`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from ..build import build_cfr_sam
from . import common
from .stage2 import validate

KEYS = ("bpq", "aji", "mpq", "det_f1", "det_precision", "det_recall", "type_accuracy")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_analysis_args(parser)
    parser.add_argument(
        "--settings",
        required=True,
        help="';'-separated min_foreground,min_score,class_weight[,blur_gate,blurred_min_score]",
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="append the lines to this file too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_cfr_sam(None, checkpoint=common.read_init(args.checkpoint))
    model.eval()
    if model.point_refiner is None:
        parser.error(f"{args.checkpoint} has no point refiner")
    val_set = common.validation_set(
        args.data, args.val_sources, args.val_limit, model.config.class_names, model.config.input_size
    )
    served = model.point_refiner.cfg
    settings = [[float(x) for x in spec.split(",")] for spec in args.settings.split(";")]
    for spec, values in zip(args.settings.split(";"), settings):
        if len(values) not in (3, 5):
            parser.error(f"--settings: {spec!r} needs 3 or 5 numbers")
    for values in settings:
        min_foreground, min_score, class_weight = values[:3]
        blur_gate, blurred_min_score = values[3:] if len(values) == 5 else (served.blur_gate, served.blurred_min_score)
        model.point_refiner.cfg = dataclasses.replace(
            served,
            min_score=min_score,
            class_weight=class_weight,
            blur_gate=blur_gate,
            blurred_min_score=blurred_min_score,
        )
        val = validate(
            model,
            val_set,
            torch.device("cpu"),
            0,
            args.radius,
            min_foreground=min_foreground,
            nms_radius=args.nms_radius,
        )
        line = json.dumps(
            {"fg": min_foreground, "min_score": min_score, "class_weight": class_weight}
            | ({"blur_gate": blur_gate, "blurred_min_score": blurred_min_score} if blur_gate > 0 else {})
            | {k: round(val[k], 4) for k in KEYS}
        )
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
