"""Stain statistics in CIE Lab and their transfer between images (Reinhard et al., 2001).

Training uses them as an augmentation (RandStainNA, Shen et al., 2022): a crop takes the Lab mean
and standard deviation of another training image's tissue, so that the model sees every lab's
stain on every set's nuclei. Glass (pixels whose optical density sums to 0.15 or less) does not
count in the statistics and does not move; tissue up to twice that density moves part of the way
(a hard cut between moved and unmoved pixels speckles pale stroma).
"""

from typing import Sequence, Tuple

import numpy as np

# sRGB (D65) -> XYZ, and the D65 white point.
_RGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE = np.array([0.95047, 1.0, 1.08883])
_EPSILON, _KAPPA = 216 / 24389, 24389 / 27

# Optical density summed over RGB at or below which a pixel is glass (Macenko's beta).
GLASS_OD = 0.15

LabStats = Tuple[Tuple[float, float, float], Tuple[float, float, float]]


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Optical density summed over RGB, per pixel ([...] for [..., 3])."""
    return -np.log((np.asarray(rgb, np.float64) + 1.0) / 256.0).sum(-1)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not glass."""
    return optical_density(rgb) > GLASS_OD


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 255] (any float or integer array [..., 3]) -> CIE Lab, float64."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > _EPSILON, np.cbrt(xyz), (_KAPPA * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE Lab -> RGB in [0, 255], float64, clipped to the gamut."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f**3 > _EPSILON, f**3, (116 * f - 16) / _KAPPA) * _WHITE
    linear = np.clip(xyz @ _XYZ_TO_RGB.T, 0, None)
    c = np.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return np.clip(c * 255.0, 0, 255)


def lab_stats(rgb: np.ndarray) -> LabStats:
    """(mean, standard deviation) of each Lab channel over the tissue; the whole image if all glass."""
    return _stats(rgb_to_lab(rgb), optical_density(rgb))


def _stats(lab: np.ndarray, od: np.ndarray) -> LabStats:
    mask = od > GLASS_OD
    values = lab[mask] if mask.sum() >= 16 else lab.reshape(-1, 3)
    return tuple(values.mean(0).tolist()), tuple(values.std(0).tolist())


# The most a channel's spread is stretched or shrunk: a crop of one tissue (stroma alone) has almost
# no spread in a* or b*, and stretching it to a whole image's would turn noise into colour.
MAX_SPREAD_RATIO = 2.0


def transfer(rgb: np.ndarray, target: LabStats, source: LabStats = None) -> np.ndarray:
    """`rgb` with its tissue's Lab statistics (or `source`'s) moved to `target`'s; float32 [0, 255]."""
    # One Lab conversion and one optical density per crop: this runs in the training loader.
    rgb = np.asarray(rgb, np.float64)
    lab, od = rgb_to_lab(rgb), optical_density(rgb)
    mean, std = source if source is not None else _stats(lab, od)
    ratio = np.clip(np.asarray(target[1]) / np.maximum(np.asarray(std), 1e-6), 1 / MAX_SPREAD_RATIO, MAX_SPREAD_RATIO)
    moved = (lab - np.asarray(mean)) * ratio + np.asarray(target[0])
    weight = np.clip((od[..., None] - GLASS_OD) / GLASS_OD, 0.0, 1.0)
    return (weight * lab_to_rgb(moved) + (1 - weight) * rgb).astype(np.float32)


def random_transfer(rgb: np.ndarray, rng: np.random.Generator, bank: Sequence[Sequence[LabStats]]) -> np.ndarray:
    """`rgb` moved to the stain of a random image of a random set of `bank` (sets weigh alike, so a
    set of many tiles does not make its stain the usual one)."""
    group = bank[int(rng.integers(len(bank)))]
    return transfer(rgb, group[int(rng.integers(len(group)))])
