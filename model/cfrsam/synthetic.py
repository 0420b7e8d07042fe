"""Deterministic synthetic H&E-like tiles (for parity fixtures, tests and benchmarks)."""

from typing import Sequence, Tuple

import numpy as np


def synthetic_he_image(size: int, seed: int = 0, nuclei: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A [size, size, 3] uint8 RGB tile: pink eosin background with purple elliptical nuclei.

    Returns (rgb, centres [n, 2] float32 (x, y) in pixels). `nuclei` = 0 picks a density of about
    one nucleus per 24 x 24 px.
    """
    rng = np.random.default_rng(seed)
    n = nuclei or max(3, (size * size) // 576)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Eosin background with low-frequency stromal texture.
    texture = np.zeros((size, size), np.float32)
    for _ in range(4):
        fx, fy = rng.uniform(0.01, 0.08, size=2)
        px, py = rng.uniform(0, 2 * np.pi, size=2)
        texture += np.sin(xx * fx * 2 * np.pi / 8 + px) * np.cos(yy * fy * 2 * np.pi / 8 + py)
    texture /= 4.0
    rgb = np.empty((size, size, 3), np.float32)
    rgb[..., 0] = 232 + 12 * texture
    rgb[..., 1] = 168 + 25 * texture
    rgb[..., 2] = 205 + 15 * texture
    margin = 6
    centres = rng.uniform(margin, size - margin, size=(n, 2)).astype(np.float32)
    for cx, cy in centres:
        a, b = rng.uniform(3.5, 8.0), rng.uniform(3.0, 6.0)
        theta = rng.uniform(0, np.pi)
        c, s = np.cos(theta), np.sin(theta)
        u = ((xx - cx) * c + (yy - cy) * s) / a
        v = (-(xx - cx) * s + (yy - cy) * c) / b
        r = np.sqrt(u * u + v * v)
        inside = np.clip(1.5 * (1.0 - r) + 0.5, 0.0, 1.0)[..., None]  # soft edge
        chroma = 1.0 - 0.25 * np.clip(1.0 - r, 0, 1)[..., None]  # darker rim-to-centre shading
        nucleus = np.array([95, 55, 145], np.float32) * chroma
        rgb = rgb * (1 - inside) + nucleus * inside
    rgb += rng.normal(0.0, 4.0, size=rgb.shape).astype(np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8), centres


def normalise(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> [1, 3, H, W] float32 `(rgb - mean) / std` (the graphs' input)."""
    x = (rgb.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
