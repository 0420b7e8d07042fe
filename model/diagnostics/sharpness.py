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
    python model/diagnostics/sharpness.py --training --cuts 1.08,1.35     (the gate's false fires as scanned)
    python model/diagnostics/sharpness.py --cpm15-at-model-scale          (20x images upsampled as the gateway does)
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cfrsam.data.scale import load_estimates  # noqa: E402
from stain_normalise import HELD_OUT_CONSEP, SETS, names, read_rgb  # noqa: E402

MODEL_MPP = 0.25


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


def percentiles(values: list) -> str:
    return " / ".join(f"{np.percentile(values, q):.3f}" for q in (5, 50, 95))


def training_sets(data: Path) -> dict:
    """{set: [image paths]}: the images training reads (CoNSeP's training sources, MoNuSeg's first
    10, NuCLS train, DSB 2018), as scanned."""
    return {
        "consep-train (training sources)": [
            data / "consep-train" / f"{n}.png" for n in names(data / "consep-train") if not HELD_OUT_CONSEP.match(n)
        ],
        "monuseg-train (the 10 trained on)": [
            data / "monuseg-train" / f"{n}.png" for n in names(data / "monuseg-train")[:-3]
        ],
        "nucls/train": [data / "nucls" / "train" / f"{n}.png" for n in names(data / "nucls" / "train")],
        "dsb2018-stained": [data / "dsb2018-stained" / f"{n}.png" for n in names(data / "dsb2018-stained")],
    }


def at_model_scale(path: Path, mpp: float) -> np.ndarray:
    """The image resampled (Lanczos, as the gateway does) from `mpp` to the model's 0.25 um/px."""
    image = Image.open(path).convert("RGB")
    factor = mpp / MODEL_MPP
    if abs(factor - 1) > 1e-3:
        image = image.resize((round(image.width * factor), round(image.height * factor)), Image.LANCZOS)
    return np.asarray(image, dtype=np.float64)


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
    parser.add_argument("--blurred", nargs="+", default=[], help="SIGMA=DIR: blur_sets.py outputs")
    parser.add_argument("--training", action="store_true", help="the training images as scanned, against --cuts")
    parser.add_argument("--cuts", default="1.08,1.35", help="cuts to count the training images below")
    parser.add_argument("--cpm15-at-model-scale", action="store_true", help="CPM-15 as stored and at 0.25 um/px")
    args = parser.parse_args()
    data = Path(args.sharp)

    if args.training:
        cuts = [float(c) for c in args.cuts.split(",")]
        for name, paths in training_sets(data).items():
            v = [sharpness(read_rgb(p)) for p in paths]
            below = ", ".join(f"below {c}: {sum(x < c for x in v)}" for c in cuts)
            print(f"{name}: {len(v)} images, min {min(v):.3f}, percentiles {percentiles(v)}, {below}")
    if args.cpm15_at_model_scale:
        for key, mpp in sorted(load_estimates().items()):
            if key.startswith("cpm15/"):
                path = data / f"{key}.png"
                print(
                    f"{key} mpp {mpp}: as stored {sharpness(read_rgb(path)):.3f}, "
                    f"at the model's scale {sharpness(at_model_scale(path, mpp)):.3f}"
                )
    if not args.blurred:
        return 0

    sharp = statistics(data)
    levels = {float(s): statistics(Path(d)) for s, d in (spec.split("=", 1) for spec in args.blurred)}
    print("set, sigma: sharpness percentiles 5 / 50 / 95 (images)")
    for name, values in sharp.items():
        print(f"{name}, sharp: {percentiles(values)} ({len(values)})")
        for sigma, sets in levels.items():
            if name in sets:
                print(f"{name}, sigma {sigma}: {percentiles(sets[name])}")
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
