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

With `--tiles`, every figure is per served tile instead of per image: each image cut into the
gateway's 256 px tiles (64 px overlap, small images padded white), the unit the prompter's gate
judges (cfrsam/prompt_learner/sharpness.py).
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cfrsam.data.scale import load_estimates  # noqa: E402
from cfrsam.prompt_learner.sharpness import tile_sharpness  # noqa: E402
from stain_normalise import HELD_OUT_CONSEP, SETS, names, read_rgb  # noqa: E402

MODEL_MPP = 0.25


def sharpness(rgb: np.ndarray) -> float:
    """std(Laplacian) / std(|gradient|) of the grey image: lower is blurrier (the gate's statistic)."""
    return tile_sharpness(rgb)


def plan_axis(length: int, size: int, overlap: int) -> list:
    """Tile starts along one axis, as the gateway plans them (packages/nuclei/src/imaging/tiling.ts)."""
    if length <= size:
        return [0]
    n = math.ceil((length - overlap) / (size - overlap))
    step = (length - size) / (n - 1)
    return [math.floor(i * step + 0.5) for i in range(n)]


def served_tiles(rgb: np.ndarray, size: int = 256, overlap: int = 64) -> list:
    """The size x size tiles the gateway sends the prompter (an image smaller than a tile padded white)."""
    tiles = []
    for y in plan_axis(rgb.shape[0], size, overlap):
        for x in plan_axis(rgb.shape[1], size, overlap):
            tile = np.full((size, size, 3), 255.0)
            part = rgb[y : y + size, x : x + size]
            tile[: part.shape[0], : part.shape[1]] = part
            tiles.append(tile)
    return tiles


def measure(rgb: np.ndarray, per_tile: bool) -> list:
    """The statistic of the image, or of each of its served tiles."""
    return [sharpness(t) for t in served_tiles(rgb)] if per_tile else [sharpness(rgb)]


def statistics(root: Path, per_tile: bool = False) -> dict:
    """{set: [sharpness of each image or tile]} over the evaluation images of `root` (the blur_sets layout)."""
    out = {}
    for name, keep in SETS.items():
        directory = root / name
        if not directory.is_dir():
            continue
        out[name] = [
            v for n in names(directory) if keep(n) for v in measure(read_rgb(directory / f"{n}.png"), per_tile)
        ]
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
    parser.add_argument("--tiles", action="store_true", help="per served 256 px tile instead of per image")
    args = parser.parse_args()
    unit = "tiles" if args.tiles else "images"
    data = Path(args.sharp)

    if args.training:
        cuts = [float(c) for c in args.cuts.split(",")]
        for name, paths in training_sets(data).items():
            v = [x for p in paths for x in measure(read_rgb(p), args.tiles)]
            below = ", ".join(f"below {c}: {sum(x < c for x in v)}" for c in cuts)
            print(f"{name}: {len(v)} {unit}, min {min(v):.3f}, percentiles {percentiles(v)}, {below}")
    if args.cpm15_at_model_scale:
        for key, mpp in sorted(load_estimates().items()):
            if key.startswith("cpm15/"):
                path = data / f"{key}.png"
                stored, scaled = measure(read_rgb(path), args.tiles), measure(at_model_scale(path, mpp), args.tiles)
                print(
                    f"{key} mpp {mpp}: as stored {min(stored):.3f}-{max(stored):.3f}, "
                    f"at the model's scale {min(scaled):.3f}-{max(scaled):.3f} ({len(scaled)} {unit})"
                )
    if not args.blurred:
        return 0

    sharp = statistics(data, args.tiles)
    levels = {float(s): statistics(Path(d), args.tiles) for s, d in (spec.split("=", 1) for spec in args.blurred)}
    print(f"set, sigma: sharpness percentiles 5 / 50 / 95 ({unit})")
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
            f"sigma {sigma}: one cut at {t:.3f} separates {accuracy:.3f} of the {unit} "
            f"({wrong_sharp} of {len(every_sharp)} sharp called blurred, {missed} of {len(every_blurred)} blurred missed)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
