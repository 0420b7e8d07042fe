"""Out-of-focus copies of the evaluation sets: every image blurred by a Gaussian of `--sigma` px (in
the set's own pixels), labels and JSON linked, for `CFRSAM_DATA=OUT scripts/eval-sets.sh`. Measures
what a scanner's focus costs the served model (docs/model-history.md, nineteenth session), and what
training with `--blur` wins back.

    python model/diagnostics/blur_sets.py --sigma 1.5 --out /tmp/blur-1.5
    SETS="consep monuseg-held-out" CFRSAM_DATA=/tmp/blur-1.5 scripts/eval-sets.sh models/tiny /tmp/eval-blur-1.5

With `--training`, the images training reads instead: CoNSeP's training-source tiles and MoNuSeg
(whose first 10 images are trained on). A setting for blurred tiles is chosen on those, not on the evaluation
sets: `refiner_grid --data OUT --val-sources 2,8,14,20,26` (PyTorch, CoNSeP tiles), or through the
services `SETS="consep-training monuseg-trained" CFRSAM_DATA=OUT scripts/eval-sets.sh BUNDLE`.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cfrsam.data import gaussian_blur  # noqa: E402
from stain_normalise import HELD_OUT_CONSEP, SETS, names, read_rgb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
    parser.add_argument("--sigma", type=float, required=True, help="the Gaussian's sigma in pixels")
    parser.add_argument("--out", required=True)
    parser.add_argument("--training", action="store_true", help="the training images instead (see above)")
    args = parser.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out)
    if args.training:
        # MoNuSeg whole (training holds its last 3 out), so that selections by name hold in the copy.
        sets = {"consep-train": lambda n: not HELD_OUT_CONSEP.match(n), "monuseg-train": lambda n: True}
    else:
        sets = SETS
    for rel, keep in sets.items():
        src, dst = data / rel, out / rel
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for n in filter(keep, names(src)):
            blurred = gaussian_blur(read_rgb(src / f"{n}.png"), args.sigma)
            Image.fromarray(np.clip(blurred.round(), 0, 255).astype(np.uint8)).save(dst / f"{n}.png")
            for suffix in (".labels.png", ".json"):
                os.symlink(src / f"{n}{suffix}", dst / f"{n}{suffix}")
        print(f"{rel}: {len(list(dst.glob('*.labels.png')))} images blurred by sigma {args.sigma} px", flush=True)


if __name__ == "__main__":
    main()
