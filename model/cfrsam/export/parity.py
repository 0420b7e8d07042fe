"""The parity fixture: deterministic inputs, PyTorch outputs as raw .bin files, and comparison."""

import hashlib
import os
from typing import Any, Dict, Tuple

import numpy as np

from ..modeling.cfr_sam import CFRSAM
from ..synthetic import normalise, synthetic_he_image
from .errors import ExportError
from .graphs import run_stage

# Per-graph parity tolerance (ORT CPU vs PyTorch CPU, float32): |d| <= atol + rtol * |torch|.
TOLERANCE = {
    "prompter": {"atol": 1e-3, "rtol": 1e-3},
    "encoder": {"atol": 1e-3, "rtol": 1e-3},
    "decoder_image": {"atol": 1e-3, "rtol": 1e-3},
    "decoder_prompts": {"atol": 2e-3, "rtol": 1e-3},
    "decoder_prompts_full": {"atol": 2e-3, "rtol": 1e-3},
    # Refined points in pixels (a soft-argmax over the crop: sub-pixel, so float noise stays small).
    "point_refiner": {"atol": 2e-3, "rtol": 1e-4},
}


def parity_prompts(size: int, centres: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Three prompts of two points: positive + padding, positive + negative, a box (corners 2/3)."""
    c = centres[:3] if len(centres) >= 3 else np.array([[0.3, 0.35], [0.6, 0.5], [0.75, 0.8]]) * size
    lim = size - 1.0
    p0 = [c[0], [0.0, 0.0]]
    p1 = [c[1], np.clip(c[1] + [9.0, 7.0], 0, lim)]
    p2 = [np.clip(c[2] - 7.0, 0, lim), np.clip(c[2] + 7.0, 0, lim)]
    coords = np.array([p0, p1, p2], dtype=np.float32)
    labels = np.array([[1, -1], [1, 0], [2, 3]], dtype=np.float32)
    return coords, labels


def _dtype_name(arr: np.ndarray) -> str:
    if arr.dtype == np.float32:
        return "float32"
    if arr.dtype == np.int64:
        return "int64"
    raise ExportError(f"unsupported parity dtype {arr.dtype}")


class FixtureWriter:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.by_digest: Dict[str, str] = {}
        os.makedirs(directory, exist_ok=True)

    def write(self, graph: str, name: str, arr: np.ndarray) -> Dict[str, Any]:
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        digest = hashlib.sha256(data + _dtype_name(arr).encode()).hexdigest()
        if digest not in self.by_digest:
            fname = f"{graph}.{name}.bin"
            with open(os.path.join(self.directory, fname), "wb") as f:
                f.write(data)
            self.by_digest[digest] = fname
        return {"dims": list(arr.shape), "dtype": _dtype_name(arr), "file": self.by_digest[digest]}


def parity_inputs(model: CFRSAM, seed: int = 0) -> Dict[str, Dict[str, np.ndarray]]:
    """Deterministic inputs for every graph (decoder inputs come from the previous stages)."""
    cfg = model.config
    size = cfg.input_size
    rgb, centres = synthetic_he_image(size, seed=seed)
    image = normalise(rgb, cfg.pixel_mean, cfg.pixel_std)
    features = run_stage(model, "encoder", {"image": image})["features"]
    prepared = run_stage(model, "decoder_image", {"features": features, "image": image})
    coords, labels = parity_prompts(size, centres)
    prompts = dict(prepared, point_coords=coords, point_labels=labels)
    graphs = {
        "prompter": {"image": image},
        "encoder": {"image": image},
        "decoder_image": {"features": features, "image": image},
        "decoder_prompts": prompts,
        "decoder_prompts_full": prompts,
    }
    if model.point_refiner is not None:
        graphs["point_refiner"] = parity_refiner_inputs(image, centres)
    return graphs


def parity_refiner_inputs(image: np.ndarray, centres: np.ndarray) -> Dict[str, np.ndarray]:
    """The synthetic image and points near its nuclei, off the pixel grid (a point on a pixel
    corner could round to either crop in float32), plus the frame's corners."""
    size = image.shape[-1]
    near = (centres[:6] if len(centres) else np.array([[0.5, 0.5]]) * size) + np.array([2.37, -1.61])
    corners = np.array([[0.25, 0.25], [size - 0.25, size - 0.25]])
    points = np.clip(np.concatenate([near, corners]), 0.1, size - 0.1).astype(np.float32)
    return {"image": image, "points": points, "image_index": np.zeros(len(points), dtype=np.int64)}


def read_bin(directory: str, spec: Dict[str, Any]) -> np.ndarray:
    dtype = {"float32": "<f4", "int64": "<i8"}[spec["dtype"]]
    arr = np.fromfile(os.path.join(directory, spec["file"]), dtype=dtype)
    expected = int(np.prod(spec["dims"])) if spec["dims"] else 1
    if arr.size != expected:
        raise ExportError(f"{spec['file']}: {arr.size} values, dims {spec['dims']} need {expected}")
    return arr.reshape(spec["dims"]).astype(arr.dtype.newbyteorder("="))


def compare(actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> Tuple[bool, float]:
    if actual.shape != expected.shape:
        return False, float("inf")
    if expected.dtype.kind in "iu":
        diff = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
        return bool((diff == 0).all()), float(diff.max()) if diff.size else 0.0
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    ok = bool((diff <= atol + rtol * np.abs(expected.astype(np.float64))).all())
    return ok, float(diff.max()) if diff.size else 0.0
