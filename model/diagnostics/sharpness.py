"""Can a tile's own pixels tell a blurred scan from a sharp one? (docs/model-history.md, twentieth session)

On blurred scans the served point refiner's score bar drops true nuclei (recall 0.698 -> 0.507 at
sigma 2.5), and a lower bar wins back more than a blur-trained refiner does; a serving rule could
lower the bar only where a tile is blurred. This measures the gate such a rule needs: a per-tile
sharpness statistic on the held-out evaluation images as scanned and on their blurred copies
(`blur_sets.py`), its spread per blur level, and how well one threshold separates them.

The statistic is the ratio of second- to first-derivative energy of the grey image,
std(Laplacian) / std(gradient magnitude): contrast and stain cancel out, and a Gaussian blur
lowers it on every set (the figures in docs/training/eval-twentieth-blur-gate.txt).

    python model/diagnostics/sharpness.py --sharp ../shared/data --blurred 1.0=/tmp/blur-1.0 2.5=/tmp/blur-2.5
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stain_normalise import SETS, names, read_rgb  # noqa: E402


def sharpness(rgb: np.ndarray) -> float:
    """std(Laplacian) / std(|gradient|) of the grey image: lower is blurrier."""
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    laplacian = ndimage.laplace(grey)
    gradient = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1)) / 8.0
    return float(laplacian.std() / max(gradient.std(), 1e-6))


def statistics(root: Path) -> dict:
    """{set: [sharpness of each image]} over the evaluation images of `root` (the blur_sets layout)."""
    out = {}
    for name, keep in SETS.items():
        directory = root / name
        if not directory.is_dir():
            continue
        out[name] = [sharpness(read_rgb(directory / f"{n}.png")) for n in names(directory) if keep(n)]
    return out


def best_threshold(sharp: list, blurred: list) -> tuple:
    """(threshold, accuracy) of the single cut `blurred if value < threshold` that separates best."""
    values = sorted(set(sharp) | set(blurred))
    best = (0.0, 0.0)
    for t in values:
        correct = sum(v >= t for v in sharp) + sum(v < t for v in blurred)
        best = max(best, (correct / (len(sharp) + len(blurred)), t))
    return best[1], best[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sharp", default=str(Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
    parser.add_argument("--blurred", nargs="+", required=True, help="SIGMA=DIR: blur_sets.py outputs")
    args = parser.parse_args()

    sharp = statistics(Path(args.sharp))
    levels = {float(s): statistics(Path(d)) for s, d in (spec.split("=", 1) for spec in args.blurred)}
    print("set, sigma: sharpness percentiles 5 / 50 / 95 (images)")
    for name, values in sharp.items():
        print(
            f"{name}, sharp: "
            + " / ".join(f"{np.percentile(values, q):.3f}" for q in (5, 50, 95))
            + f" ({len(values)})"
        )
        for sigma, sets in levels.items():
            if name in sets:
                v = sets[name]
                print(f"{name}, sigma {sigma}: " + " / ".join(f"{np.percentile(v, q):.3f}" for q in (5, 50, 95)))
    every_sharp = [v for values in sharp.values() for v in values]
    for sigma, sets in levels.items():
        every_blurred = [v for values in sets.values() for v in values]
        t, accuracy = best_threshold(every_sharp, every_blurred)
        wrong_sharp = sum(v < t for v in every_sharp)
        missed = sum(v >= t for v in every_blurred)
        print(
            f"sigma {sigma}: one cut at {t:.3f} separates {accuracy:.3f} of the images "
            f"({wrong_sharp} of {len(every_sharp)} sharp called blurred, {missed} of {len(every_blurred)} blurred missed)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
