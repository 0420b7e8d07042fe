"""Scale (micrometres per pixel) of training images whose JSON gives none, estimated from their nuclei.

CPM-15 mixes 20x and 40x images without saying which; trained as they are, its 20x images teach
the model nuclei half their size at the model's resolution. A nucleus' size is the best scale
signal an annotated image carries: the median equivalent diameter of its annotated nuclei,
compared with that of a reference set of known scale (MoNuSeg at 0.25 um/px), gives the image's
mpp, snapped to the nearest scanner magnification (log scale: 40x 0.25, 20x 0.5).

    python -m cfrsam.data.scale --sets cpm15 --out cfrsam/data/estimated_mpp.json

The table is committed (`estimated_mpp.json`, keyed "<set folder>/<sample>") with the diameters
it came from; `NucleiDataset(target_mpp=..., mpp_estimates=...)` uses it for samples without `mpp`.
"""

import argparse
import json
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np

from .dataset import (
    _LABEL_SUFFIX,
    default_data_root,
    estimate_key,
    list_samples,
    read_labels,
    read_meta,
)

ESTIMATES_PATH = Path(__file__).with_name("estimated_mpp.json")
MAGNIFICATION_MPP = (0.25, 0.5)  # 40x, 20x


def median_diameter(labels: np.ndarray) -> float:
    """Median equivalent-circle diameter (px) of the instances of a label map; nan when none."""
    counts = np.bincount(labels.ravel())[1:]
    counts = counts[counts > 0]
    if counts.size == 0:
        return float("nan")
    return float(np.median(2.0 * np.sqrt(counts / np.pi)))


def snap_mpp(mpp: float, candidates: Sequence[float] = MAGNIFICATION_MPP) -> float:
    """The candidate nearest to `mpp` on a log scale (0.25 and 0.5 meet at 0.354)."""
    return min(candidates, key=lambda c: abs(math.log(mpp / c)))


def estimate_mpp(diameter: float, reference_diameter: float, reference_mpp: float) -> float:
    """mpp at which nuclei of `diameter` px have the reference's physical size, snapped."""
    return snap_mpp(reference_mpp * reference_diameter / diameter)


def load_estimates(path: Union[str, Path, None] = None) -> Dict[str, float]:
    """{"<set folder>/<sample>": mpp} from the committed table (empty when the file is absent)."""
    p = Path(path) if path is not None else ESTIMATES_PATH
    if not p.is_file():
        return {}
    with open(p) as f:
        return {k: float(v["mpp"]) for k, v in json.load(f)["samples"].items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(default_data_root()))
    parser.add_argument("--sets", default="cpm15", help="comma-separated set folders to estimate")
    parser.add_argument("--reference", default="monuseg-train", help="a set whose samples give their mpp")
    parser.add_argument("--out", default=str(ESTIMATES_PATH))
    args = parser.parse_args(argv)
    data = Path(args.data)

    ref_root = data / args.reference
    ref = []
    for name in list_samples(ref_root):
        meta = read_meta(ref_root / f"{name}.json")
        if not meta.get("mpp"):
            continue
        # Diameters in micrometres, so a reference of mixed scale still gives one physical size.
        ref.append(median_diameter(read_labels(ref_root / f"{name}{_LABEL_SUFFIX}")) * float(meta["mpp"]))
    if not ref:
        raise SystemExit(f"no sample of {ref_root} gives an mpp")
    reference_um = float(np.median(ref))
    reference_mpp = MAGNIFICATION_MPP[0]
    reference_px = reference_um / reference_mpp

    samples = {}
    for set_name in [s for s in args.sets.split(",") if s]:
        root = data / set_name
        for name in list_samples(root):
            meta = read_meta(root / f"{name}.json")
            if meta.get("mpp"):
                continue
            d = median_diameter(read_labels(root / f"{name}{_LABEL_SUFFIX}"))
            if not math.isfinite(d):
                continue
            mpp = estimate_mpp(d, reference_px, reference_mpp)
            samples[estimate_key(root, name)] = {"mpp": mpp, "median_diameter_px": round(d, 2)}
            print(f"{set_name}/{name}: median diameter {d:.1f} px -> {mpp} um/px")
    table = {
        "method": "median equivalent diameter of the annotated nuclei against the reference set's, "
        "snapped to 0.25 / 0.5 um/px on a log scale (python -m cfrsam.data.scale)",
        "reference": {"set": args.reference, "median_diameter_um": round(reference_um, 3), "images": len(ref)},
        "samples": samples,
    }
    with open(args.out, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    print(
        f"reference {args.reference}: median diameter {reference_um:.2f} um ({reference_px:.1f} px at 0.25); wrote {args.out}"
    )


if __name__ == "__main__":
    main()
