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
    return {
        "prompter": {"image": image},
        "encoder": {"image": image},
        "decoder_image": {"features": features, "image": image},
        "decoder_prompts": prompts,
        "decoder_prompts_full": prompts,
    }


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
