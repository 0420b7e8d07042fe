"""The segmentation stage of two models mixed weight by weight (docs/model-history.md, nineteenth session).

WiSE-FT's idea without training: `alpha * A + (1 - alpha) * B` over the SAM side (image encoder,
HMFM, prompt encoder, mask decoder, BGMR) of two checkpoints or bundles of the same config, where A
was trained on from B; alpha in (0, 1) interpolates, alpha > 1 goes on past A. The prompt learner
and the point refiner stay A's. The output is a checkpoint for `cfrsam.train.finalize --stage2`,
which validates it; export and `scripts/eval-sets.sh` then score it through the services.

    cd model && python3 diagnostics/interpolate_weights.py ../models/tiny /tmp/prev/models/tiny 0.5 ../runs/mixed.pt
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfrsam.train import common  # noqa: E402

KEPT_FROM_A = ("prompt_learner.", "point_refiner.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="checkpoint or bundle directory (the later model)")
    parser.add_argument("b", help="checkpoint or bundle directory (the model A was trained from)")
    parser.add_argument("alpha", type=float, help="A's weight: 1 is A, 0 is B")
    parser.add_argument("out", help="checkpoint to write")
    args = parser.parse_args(argv)

    a, b = common.read_init(args.a), common.read_init(args.b)
    if a["config"] != b["config"]:
        sys.exit("the two models have different configs; their weights cannot be mixed")
    mixed = {}
    for key, value in a["model"].items():
        if value.is_floating_point() and not key.startswith(KEPT_FROM_A):
            mixed[key] = args.alpha * value.float() + (1 - args.alpha) * b["model"][key].float()
        else:
            mixed[key] = value
    torch.save({**a, "model": mixed}, args.out)
    print(f"wrote {args.out}: alpha {args.alpha} over {sum(not k.startswith(KEPT_FROM_A) for k in mixed)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
