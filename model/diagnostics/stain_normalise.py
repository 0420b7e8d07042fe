"""Test-time stain normalisation, measured before anything is built: writes copies of evaluation
sets whose images are normalised to the training images' stain (Reinhard in CIE Lab, or Macenko's
stain vectors), labels and JSON linked, for `CFRSAM_DATA=OUT scripts/eval-sets.sh`.

    python model/diagnostics/stain_normalise.py --method macenko --out /tmp/stain-macenko

The reference is computed from the training images (CoNSeP's training sources, the MoNuSeg images
training keeps, NuCLS train), never from the images normalised.
"""

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfrsam.data.stain import lab_stats, tissue_mask, transfer  # noqa: E402

HELD_OUT_CONSEP = re.compile(r"^train_(3|9|15|21|27)_")
# The eval-sets.sh sets: (directory under the data root, sample filter).
SETS = {
    "consep-train": lambda n: bool(HELD_OUT_CONSEP.match(n)),
    "monuseg-train": lambda n: True,
    "nucls/test": lambda n: True,
    "cpm15": lambda n: True,
}


def names(directory: Path):
    return sorted(p.name[: -len(".labels.png")] for p in directory.glob("*.labels.png"))


def training_images(data: Path, which: str = "all"):
    consep = [data / "consep-train" / f"{n}.png" for n in names(data / "consep-train") if not HELD_OUT_CONSEP.match(n)]
    monuseg = [data / "monuseg-train" / f"{n}.png" for n in names(data / "monuseg-train")[:-3]]
    nucls = [data / "nucls" / "train" / f"{n}.png" for n in names(data / "nucls" / "train")]
    return {"all": consep[::8] + monuseg + nucls, "consep": consep[::4]}[which]


def read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


# ---- Macenko ---------------------------------------------------------------------------------------
def macenko_stains(rgb: np.ndarray, alpha: float = 1.0):
    """(stain matrix [3, 2]: haematoxylin, eosin columns; 99th percentile of each concentration)."""
    od = -np.log((rgb.reshape(-1, 3) + 1.0) / 256.0)
    od_t = od[(od > 0.15).all(1)]
    _, vecs = np.linalg.eigh(np.cov(od_t.T))
    plane = vecs[:, 1:3]
    proj = od_t @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v1, v2], 1) if v1[0] > v2[0] else np.stack([v2, v1], 1)
    he = he * np.sign(he.sum(0, keepdims=True))
    he /= np.linalg.norm(he, axis=0, keepdims=True)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    return he, np.percentile(conc, 99, axis=1)


def macenko(rgb: np.ndarray, ref, stains=None, strength: float = 1.0) -> np.ndarray:
    """`stains`: the image's own (stain matrix, maxima) when measured over more than this image
    (its source or slide); `strength` < 1 moves the stain only part of the way to the reference."""
    he, max_c = stains if stains is not None else macenko_stains(rgb)
    target_he = (1 - strength) * he + strength * ref[0]
    target_he = target_he / np.linalg.norm(target_he, axis=0, keepdims=True)
    target_c = (1 - strength) * max_c + strength * ref[1]
    od = -np.log((rgb.reshape(-1, 3) + 1.0) / 256.0)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0] * (target_c / np.maximum(max_c, 1e-6))[:, None]
    out = np.clip(256.0 * np.exp(-(target_he @ conc)).T - 1.0, 0, 255).reshape(rgb.shape)
    return np.where(tissue_mask(rgb)[..., None], out, rgb)


def reference(method: str, images):
    if method == "reinhard":
        stats = [lab_stats(read_rgb(p)) for p in images]
        return np.mean([s[0] for s in stats], 0), np.mean([s[1] for s in stats], 0)
    stains = [macenko_stains(read_rgb(p)) for p in images]
    he = np.median(np.stack([s[0] for s in stains]), 0)
    he /= np.linalg.norm(he, axis=0, keepdims=True)
    return he, np.median(np.stack([s[1] for s in stains]), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
    parser.add_argument("--method", choices=("reinhard", "macenko"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference", choices=("all", "consep"), default="all", help="which training images")
    parser.add_argument("--strength", type=float, default=1.0, help="macenko: how far towards the reference")
    parser.add_argument(
        "--per-source", action="store_true", help="macenko: CoNSeP tiles take the stain of their whole source image"
    )
    args = parser.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out)
    ref = reference(args.method, training_images(data, args.reference))
    print(f"{args.method} reference:", json.dumps([np.round(np.asarray(r), 4).tolist() for r in ref]), flush=True)
    for rel, keep in SETS.items():
        src, dst = data / rel, out / rel
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        selected = list(filter(keep, names(src)))
        by_source = {}
        if args.per_source and rel == "consep-train":
            for n in selected:
                by_source.setdefault(n.rsplit("_", 1)[0], []).append(read_rgb(src / f"{n}.png"))
            by_source = {k: macenko_stains(np.concatenate(v, 0)) for k, v in by_source.items()}
        for n in selected:
            rgb = read_rgb(src / f"{n}.png")
            if args.method == "reinhard":
                normalised = transfer(rgb, ref)  # Reinhard: the training's transfer, to the mean statistics
            else:
                normalised = macenko(rgb, ref, by_source.get(n.rsplit("_", 1)[0]), args.strength)
            Image.fromarray(normalised.round().astype(np.uint8)).save(dst / f"{n}.png")
            for suffix in (".labels.png", ".json"):
                os.symlink(src / f"{n}{suffix}", dst / f"{n}{suffix}")
        print(f"{rel}: {len(list(dst.glob('*.labels.png')))} images", flush=True)


if __name__ == "__main__":
    main()
