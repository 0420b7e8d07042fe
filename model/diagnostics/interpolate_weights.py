"""One part of two models mixed weight by weight (docs/model-history.md, nineteenth and twentieth sessions).

WiSE-FT's idea without training: `alpha * A + (1 - alpha) * B` over one part of two checkpoints or
bundles of the same config, where A was trained on from B; alpha in (0, 1) interpolates, alpha > 1
goes on past A. `--part sam` (the default) mixes the SAM side (image encoder, HMFM, prompt encoder,
mask decoder, BGMR), `--part refiner` the point refiner; everything else stays A's. The output is a
checkpoint for `cfrsam.train.finalize --stage2`, which validates it; export and
`scripts/eval-sets.sh` then score it through the services.

    cd model && python3 diagnostics/interpolate_weights.py ../models/tiny /tmp/prev/models/tiny 0.5 ../runs/mixed.pt
    cd model && python3 diagnostics/interpolate_weights.py --part refiner ../runs/final-refblur.pt ../models/tiny 0.5 ../runs/r.pt
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfrsam.configs import CFRSAMConfig  # noqa: E402
from cfrsam.prompt_learner.point_refiner import PointRefinerConfig  # noqa: E402
from cfrsam.train import common  # noqa: E402

NOT_SAM_SIDE = ("prompt_learner.", "point_refiner.")


def mixed_part(key: str, part: str) -> bool:
    """Whether `key` belongs to the part being mixed."""
    if part == "refiner":
        return key.startswith("point_refiner.")
    return not key.startswith(NOT_SAM_SIDE)


def normalised(config: dict) -> dict:
    """A config as its dataclasses read it: defaults filled in, tuples and lists alike."""
    d = CFRSAMConfig.from_dict(config).to_dict()
    if d.get("point_refiner"):
        d["point_refiner"] = PointRefinerConfig.from_dict(d["point_refiner"]).to_dict()
    return d


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="checkpoint or bundle directory (the later model)")
    parser.add_argument("b", help="checkpoint or bundle directory (the model A was trained from)")
    parser.add_argument("alpha", type=float, help="A's weight: 1 is A, 0 is B")
    parser.add_argument("out", help="checkpoint to write")
    parser.add_argument("--part", choices=("sam", "refiner"), default="sam", help="what to mix (default: %(default)s)")
    args = parser.parse_args(argv)

    a, b = common.read_init(args.a), common.read_init(args.b)
    if normalised(a["config"]) != normalised(b["config"]):
        sys.exit("the two models have different configs; their weights cannot be mixed")
    mixed = {}
    for key, value in a["model"].items():
        if value.is_floating_point() and mixed_part(key, args.part):
            mixed[key] = args.alpha * value.float() + (1 - args.alpha) * b["model"][key].float()
        else:
            mixed[key] = value
    torch.save({**a, "model": mixed}, args.out)
    print(
        f"wrote {args.out}: alpha {args.alpha} over {sum(mixed_part(k, args.part) for k in mixed)} tensors ({args.part})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
