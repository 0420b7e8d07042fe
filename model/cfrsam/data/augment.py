"""Training augmentations on numpy arrays (no export path: they run in the data loader only).

Geometry works on (image [H, W, 3], labels [H, W], centroids [N, 2]) together, with centroids in
continuous pixel coordinates (pixel (i, j) has centre (j + 0.5, i + 0.5)), so they are transformed
exactly rather than recomputed from the transformed label map. Colour works on float32 RGB in
[0, 255].
"""

from dataclasses import dataclass
from typing import Tuple

import numpy as np
from scipy.ndimage import gaussian_filter

from .stain import random_transfer


@dataclass(frozen=True)
class AugmentConfig:
    flip_rotate: bool = True  # all 8 symmetries of the square (90° rotations x horizontal flip)
    scale_range: Tuple[float, float] = (0.9, 1.1)  # zoom factor; 1 = none
    color_prob: float = 0.8
    brightness: float = 0.15  # multiplicative, factor in [1 - b, 1 + b]
    contrast: float = 0.15
    saturation: float = 0.1
    hue: float = 0.03  # fraction of a full turn of the hue circle
    stain_prob: float = 0.5
    stain_scale: float = 0.05  # per-stain concentration factor in [1 - s, 1 + s]
    stain_shift: float = 0.02  # per-stain optical-density shift in [-s, s]
    noise_prob: float = 0.2
    noise_std: float = 3.0  # grey levels
    # Stain transfer (RandStainNA): with this probability a crop takes the Lab statistics of a
    # training image drawn from `stain_bank` (one tuple of (mean, std) pairs per set); 0 = off.
    stain_transfer_prob: float = 0.0
    stain_bank: Tuple = ()
    # Focus blur (a scanner's optics, a slide not quite in its focal plane): with this probability
    # a crop is blurred by a Gaussian of sigma drawn uniformly from `blur_sigma`, in the crop's
    # pixels (the model's scale); 0 = off.
    blur_prob: float = 0.0
    blur_sigma: Tuple[float, float] = (0.5, 2.0)


def flip_rotate(
    image: np.ndarray, labels: np.ndarray, centroids: np.ndarray, k: int, flip: bool
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotate by k * 90° counter-clockwise (np.rot90), then flip left-right if `flip`."""
    pts = centroids.astype(np.float32).copy()
    for _ in range(k % 4):
        w = image.shape[1]
        image = np.rot90(image)
        labels = np.rot90(labels)
        # new[i, j] = old[j, W - 1 - i]  =>  (x, y) -> (y, W - x)
        pts = np.stack([pts[:, 1], w - pts[:, 0]], axis=1)
    if flip:
        w = image.shape[1]
        image = image[:, ::-1]
        labels = labels[:, ::-1]
        pts = np.stack([w - pts[:, 0], pts[:, 1]], axis=1)
    return np.ascontiguousarray(image), np.ascontiguousarray(labels), pts.reshape(-1, 2)


def random_flip_rotate(image, labels, centroids, rng: np.random.Generator):
    return flip_rotate(image, labels, centroids, int(rng.integers(4)), bool(rng.random() < 0.5))


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter in random order, float RGB in [0, 255]."""
    grey_weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    ops = rng.permutation(4)
    for op in ops:
        if op == 0 and brightness > 0:
            image = image * rng.uniform(1 - brightness, 1 + brightness)
        elif op == 1 and contrast > 0:
            mean = float((image @ grey_weights).mean())
            image = (image - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
        elif op == 2 and saturation > 0:
            grey = (image @ grey_weights)[..., None]
            image = (image - grey) * rng.uniform(1 - saturation, 1 + saturation) + grey
        elif op == 3 and hue > 0:
            image = rotate_hue(image, rng.uniform(-hue, hue) * 2 * np.pi)
        image = np.clip(image, 0, 255)
    return image.astype(np.float32)


# YIQ: hue is the angle in the (I, Q) plane, so a hue shift is a rotation there.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def rotate_hue(image: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float32)
    matrix = _YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ
    return image @ matrix.T


# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB), as in skimage.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def stain_jitter(image: np.ndarray, rng: np.random.Generator, scale: float, shift: float) -> np.ndarray:
    """H&E stain augmentation (Tellez et al., 2018): perturb each stain's concentration.

    RGB -> optical density -> stain concentrations (colour deconvolution); each stain c becomes
    c * a + b with a ~ U(1 - scale, 1 + scale), b ~ U(-shift, shift); then back to RGB.
    """
    od = -np.log((image + 1.0) / 256.0)
    concentrations = od @ _HED_FROM_RGB
    a = rng.uniform(1 - scale, 1 + scale, size=3).astype(np.float32)
    b = rng.uniform(-shift, shift, size=3).astype(np.float32)
    od = (concentrations * a + b) @ _RGB_FROM_HED
    return np.clip(256.0 * np.exp(-od) - 1.0, 0, 255).astype(np.float32)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Each channel of an [H, W, 3] image blurred by a Gaussian of `sigma` px (edges mirrored)."""
    return gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0), mode="reflect")


def random_blur(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Focus blur with probability `cfg.blur_prob` (geometry and labels are untouched)."""
    if cfg.blur_prob <= 0 or rng.random() >= cfg.blur_prob:
        return image
    return gaussian_blur(image, float(rng.uniform(*cfg.blur_sigma)))


def random_color(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """All colour augmentations of `cfg`, float32 RGB in [0, 255] in and out."""
    image = image.astype(np.float32)
    if cfg.stain_bank and rng.random() < cfg.stain_transfer_prob:
        image = random_transfer(image, rng, cfg.stain_bank)
    if rng.random() < cfg.stain_prob:
        image = stain_jitter(image, rng, cfg.stain_scale, cfg.stain_shift)
    if rng.random() < cfg.color_prob:
        image = color_jitter(image, rng, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    if rng.random() < cfg.noise_prob and cfg.noise_std > 0:
        image = np.clip(image + rng.normal(0, cfg.noise_std, image.shape), 0, 255)
    return image.astype(np.float32)
