"""Annotated nuclei tiles in the shared layout (../shared/data/README.md).

Each sample NAME in a set directory is NAME.png (8-bit RGB), NAME.labels.png (16-bit grey instance
map, 0 = background, 1..N nuclei) and NAME.json (`classNames`, optional `classes` {"id": index},
optional `mpp`).

Coordinates are continuous pixels: pixel (row i, column j) has centre (x, y) = (j + 0.5, i + 0.5),
and a nucleus centroid is the mean of its pixels' centres.

Classes. Every nucleus first gets a class *name*: classNames[classes[id]] when the JSON lists it;
classNames[0] when the set has a single class (MoNuSeg, CPM-15: "nucleus"); otherwise none. The
name is then mapped to the target taxonomy: with `class_map` ({name: index}) a name maps to its
index and a name missing from the map (or mapped to a negative index) is UNKNOWN_CLASS (-1); without
`class_map` the dataset's own indices are kept. UNKNOWN_CLASS nuclei are real nuclei with no usable
class: the prompt learner's loss trains their anchors to "some nucleus class" and does not guess
which. For example, training on CoNSeP's taxonomy plus MoNuSeg uses
class_map={"other": 0, "inflammatory": 1, "epithelial": 2, "spindle-shaped": 3}, which leaves
MoNuSeg's "nucleus" unknown; class_map={"nucleus": 0, ...} would instead force them to class 0.
"""

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .augment import AugmentConfig, random_blur, random_color, random_flip_rotate

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
UNKNOWN_CLASS = -1
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"

_LABEL_SUFFIX = ".labels.png"
_CONSEP_TILE = re.compile(r"^train_(\d+)_\d+$")


# ---------------------------------------------------------------------------------------------
# Files


def list_samples(root: Union[str, Path]) -> List[str]:
    """Names of the complete samples (image, labels and JSON present) in `root`, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    names = []
    for path in sorted(root.glob("*" + _LABEL_SUFFIX)):
        name = path.name[: -len(_LABEL_SUFFIX)]
        if image_path(root, name) is not None and (root / f"{name}.json").is_file():
            names.append(name)
    return names


def image_path(root: Path, name: str) -> Optional[Path]:
    """NAME.png, else NAME.jpg (a packed copy: `python -m cfrsam.data.pack` re-encodes the images
    as JPEG so that the training data fits what travels to a GPU machine); None if neither."""
    for suffix in (".png", ".jpg"):
        if (root / f"{name}{suffix}").is_file():
            return root / f"{name}{suffix}"
    return None


def read_image(path: Union[str, Path]) -> np.ndarray:
    """[H, W, 3] uint8 RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_labels(path: Union[str, Path]) -> np.ndarray:
    """[H, W] int32 instance map, read exactly from a 16-bit (or 8-bit) grey PNG.

    Pillow opens a 16-bit grey PNG as mode 'I;16' (or 'I' on some versions); `convert` would clip
    or rescale, so the raw values are taken directly from those modes.
    """
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "L"):
            labels = np.asarray(im).astype(np.int32)
        else:
            raise ValueError(f"{path}: label map must be a grey PNG (16-bit), got mode {im.mode}")
    if labels.ndim != 2:
        raise ValueError(f"{path}: label map must be 2-D, got shape {labels.shape}")
    if labels.min() < 0:
        raise ValueError(f"{path}: negative labels")
    return labels


def read_meta(path: Union[str, Path]) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def estimate_key(root: Union[str, Path], name: str) -> str:
    """A sample's key in the scale estimates (data/estimated_mpp.json): "<set folder>/<sample>"."""
    return f"{Path(root).name}/{name}"


def lookup_mpp(
    meta: Mapping, root: Union[str, Path], name: str, estimates: Optional[Mapping[str, float]]
) -> Optional[float]:
    """The sample's own mpp, else its estimate, else None."""
    mpp = meta.get("mpp")
    if isinstance(mpp, (int, float)) and mpp > 0:
        return float(mpp)
    if estimates:
        return estimates.get(estimate_key(root, name))
    return None


def instance_centroids(labels: np.ndarray, num_ids: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Centroids [M + 1, 2] (x, y; row 0 = background, unused) and pixel counts [M + 1]."""
    m = int(labels.max()) if num_ids is None else num_ids
    flat = labels.ravel()
    h, w = labels.shape
    counts = np.bincount(flat, minlength=m + 1).astype(np.float64)
    xs = np.tile(np.arange(w, dtype=np.float64) + 0.5, h)
    ys = np.repeat(np.arange(h, dtype=np.float64) + 0.5, w)
    sx = np.bincount(flat, weights=xs, minlength=m + 1)
    sy = np.bincount(flat, weights=ys, minlength=m + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = np.stack([sx / counts, sy / counts], axis=1)
    return centroids, counts


def instance_classes(
    meta: Mapping[str, Any], num_ids: int, class_map: Optional[Mapping[str, int]] = None
) -> np.ndarray:
    """Target class of each instance id, [num_ids + 1] int64 (index 0 unused); see module doc."""
    names: List[str] = list(meta.get("classNames") or [])
    per_id: Mapping[str, int] = meta.get("classes") or {}
    result = np.full(num_ids + 1, UNKNOWN_CLASS, dtype=np.int64)
    for i in range(1, num_ids + 1):
        index = per_id.get(str(i))
        if index is None and len(names) == 1:
            index = 0
        if index is None:
            continue
        if class_map is None:
            result[i] = int(index)
        else:
            name = names[int(index)] if 0 <= int(index) < len(names) else None
            target = class_map.get(name, UNKNOWN_CLASS) if name is not None else UNKNOWN_CLASS
            result[i] = int(target) if target >= 0 else UNKNOWN_CLASS
    return result


# ---------------------------------------------------------------------------------------------
# Splits


def source_of(name: str) -> str:
    """The source image of a sample: K for CoNSeP tiles `train_K_XXX`, else the name itself."""
    match = _CONSEP_TILE.match(name)
    return match.group(1) if match else name


def split_by_source(names: Sequence[str], val_sources: Iterable[Union[int, str]]) -> Tuple[List[str], List[str]]:
    """(train, val) names, with every tile of a validation source image in val.

    Splitting CoNSeP by tile would put neighbouring (overlapping-context) tiles of one image on both
    sides; splitting by source image K does not. val_sources are Ks (int or str) or whole names.
    """
    val = {str(v) for v in val_sources}
    train_names = [n for n in names if source_of(n) not in val]
    val_names = [n for n in names if source_of(n) in val]
    return train_names, val_names


# ---------------------------------------------------------------------------------------------
# Dataset


class NucleiDataset(Dataset):
    """Samples of one set directory, as crops of `size` x `size`.

    Args:
      root: a set directory (e.g. ../shared/data/consep-train).
      names: sample names to use (default: all complete samples in root).
      size: crop side in pixels; images smaller than that are padded with `pad_value` (white, like
        empty glass) on the right and bottom. None keeps whole images (batch them one at a time).
      augment: False, True (AugmentConfig() defaults) or an AugmentConfig.
      split: None (all names), "train" or "val": filter names with `split_by_source(val_sources)`.
      val_sources: CoNSeP source image numbers K (or names) held out for "val".
      class_map: {class name: target index}; see the module doc. None keeps the set's indices.
      crop: "random" or "center" (deterministic, for validation).
      cache: keep decoded images and labels in memory.
      target_mpp: resample every sample whose JSON gives an `mpp` to this many micrometres per pixel
        (before the scale jitter); samples without `mpp` keep their pixels. None: no resampling.
      mpp_estimates: {"<set folder>/<sample>": mpp} for samples whose JSON gives none (see
        data/scale.py: CPM-15's 20x images); used only with target_mpp.

    Item: dict with
      image       [3, S, S] float32, (rgb - SAM mean) / SAM std
      instances   [S, S] int64, 1..N for the listed nuclei in row order, 0 elsewhere
      foreground  [S, S] float32, 1 on every nucleus pixel (also nuclei cut by the crop whose
                  centroid fell outside it, which are 0 in `instances` and not listed)
      centroids   [N, 2] float32 (x, y) pixels
      classes     [N] int64 target classes (UNKNOWN_CLASS = -1 for unknown)
      instance_ids [N] int64, the nuclei's ids in the source label map
      name, mpp (float or None, of the source image), origin (x0, y0) of the crop in the source
      image, scale (output pixels per source pixel; 1 without zoom).
    """

    def __init__(
        self,
        root: Union[str, Path],
        names: Optional[Sequence[str]] = None,
        size: Optional[int] = 256,
        augment: Union[bool, AugmentConfig] = False,
        split: Optional[str] = None,
        val_sources: Optional[Iterable[Union[int, str]]] = None,
        class_map: Optional[Mapping[str, int]] = None,
        crop: str = "random",
        pad_value: int = 255,
        cache: bool = False,
        target_mpp: Optional[float] = None,
        mpp_estimates: Optional[Mapping[str, float]] = None,
    ) -> None:
        if target_mpp is not None and not target_mpp > 0:
            raise ValueError(f"target_mpp must be positive, got {target_mpp!r}")
        self.target_mpp = target_mpp
        self.mpp_estimates = dict(mpp_estimates or {})
        self.root = Path(root)
        names = list(names) if names is not None else list_samples(self.root)
        if split is not None:
            if split not in ("train", "val"):
                raise ValueError(f"split must be None, 'train' or 'val', got {split!r}")
            if val_sources is None:
                raise ValueError("split needs val_sources")
            train_names, val_names = split_by_source(names, val_sources)
            names = train_names if split == "train" else val_names
        missing = [n for n in names if not (self.root / f"{n}{_LABEL_SUFFIX}").is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} samples missing in {self.root}: {missing[:5]}")
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        self.names = names
        self.size = size
        if augment is True:
            augment = AugmentConfig()
        self.augment: Optional[AugmentConfig] = augment or None
        self.class_map = dict(class_map) if class_map is not None else None
        self.crop = crop
        self.pad_value = pad_value
        self.cache = cache
        self._cache: Dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.names)

    def load(self, name: str) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
        """(image [H, W, 3] uint8, labels [H, W] int32, meta) of one sample."""
        image, labels, meta, _, _ = self._load(name)
        return image, labels, meta

    def _load(self, name: str):
        """load() plus the whole-image centroids [M + 1, 2], pixel counts and target classes."""
        if name in self._cache:
            return self._cache[name]
        image = read_image(image_path(self.root, name))
        labels = read_labels(self.root / f"{name}{_LABEL_SUFFIX}")
        meta = read_meta(self.root / f"{name}.json")
        if image.shape[:2] != labels.shape:
            raise ValueError(f"{name}: image {image.shape[:2]} and labels {labels.shape} differ")
        num_ids = int(labels.max())
        centroids, counts = instance_centroids(labels, num_ids)
        classes = instance_classes(meta, num_ids, self.class_map)
        sample = (image, labels, meta, (centroids, counts), classes)
        if self.cache:
            self._cache[name] = sample
        return sample

    def __getitem__(self, index: int) -> Dict[str, Any]:
        # Seeded from torch so that DataLoader workers (which torch seeds apart) differ.
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        name = self.names[index]
        image, labels, meta, (centroids, counts), classes = self._load(name)
        num_ids = len(counts) - 1
        ids = np.nonzero(counts[1:] > 0)[0] + 1
        points = centroids[ids].astype(np.float32)

        scale = 1.0
        if self.augment is not None:
            lo, hi = self.augment.scale_range
            scale = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
        mpp = lookup_mpp(meta, self.root, name, self.mpp_estimates)
        if self.target_mpp is not None and mpp is not None:
            # Output pixels per source pixel: a 0.5 um/px image is enlarged 2x to 0.25 um/px.
            scale *= float(mpp) / self.target_mpp
        origin = (0, 0)
        if self.size is not None:
            image, labels, points, origin, scale = self._crop(image, labels, points, scale, rng)

        size_h, size_w = labels.shape
        inside = (points[:, 0] >= 0) & (points[:, 0] < size_w) & (points[:, 1] >= 0) & (points[:, 1] < size_h)
        ids, points = ids[inside], points[inside]

        if self.augment is not None:
            if self.augment.flip_rotate:
                image, labels, points = random_flip_rotate(image, labels, points, rng)
            # The optics blur what the scanner sees; stain, colour and sensor noise come after.
            image = random_blur(image, rng, self.augment)
            image = random_color(image, rng, self.augment)

        lookup = np.zeros(num_ids + 1, dtype=np.int64)
        lookup[ids] = np.arange(1, len(ids) + 1)
        instances = lookup[labels]
        foreground = (labels > 0).astype(np.float32)

        mean = np.asarray(SAM_PIXEL_MEAN, dtype=np.float32)
        std = np.asarray(SAM_PIXEL_STD, dtype=np.float32)
        pixels = (image.astype(np.float32) - mean) / std
        return {
            "image": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
            "instances": torch.from_numpy(instances),
            "foreground": torch.from_numpy(foreground),
            "centroids": torch.from_numpy(points.astype(np.float32).reshape(-1, 2)),
            "classes": torch.from_numpy(classes[ids]),
            "instance_ids": torch.from_numpy(ids.astype(np.int64)),
            "name": name,
            "mpp": meta.get("mpp"),
            "origin": origin,
            "scale": scale,
        }

    def _crop(self, image, labels, points, scale, rng):
        """Crop a (size / scale)-sided square, resize it to size; move centroids along."""
        size = self.size
        h, w = labels.shape
        # Zooming out never reaches past the image (that would only add padding): the side is
        # capped at the image's shorter side, or at `size` for images smaller than a crop.
        side = min(max(1, int(round(size / scale))), max(min(h, w), size))
        if h < side or w < side:
            ph, pw = max(side - h, 0), max(side - w, 0)
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=self.pad_value)
            labels = np.pad(labels, ((0, ph), (0, pw)), constant_values=0)
            h, w = labels.shape
        if self.crop == "random":
            y0 = int(rng.integers(0, h - side + 1))
            x0 = int(rng.integers(0, w - side + 1))
        else:
            y0, x0 = (h - side) // 2, (w - side) // 2
        image = image[y0 : y0 + side, x0 : x0 + side]
        labels = labels[y0 : y0 + side, x0 : x0 + side]
        points = points - np.array([x0, y0], dtype=np.float32)
        if side != size:
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
            labels = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((size, size), Image.NEAREST)).astype(
                np.int32
            )
            points = points * (size / side)
        return image, labels, points, (x0, y0), size / side


def collate_nuclei(batch: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack the fixed-size tensors; keep the per-nucleus ones (variable N) as lists."""
    stacked = ("image", "instances", "foreground")
    out: Dict[str, Any] = {key: torch.stack([item[key] for item in batch]) for key in stacked}
    for key in batch[0]:
        if key not in stacked:
            out[key] = [item[key] for item in batch]
    return out


def default_data_root() -> Path:
    """../shared/data relative to the repository (override with CFRSAM_DATA)."""
    env = os.environ.get("CFRSAM_DATA")
    return Path(env) if env else DEFAULT_DATA_ROOT.resolve()
