"""A tile's focus: the statistic the point refiner's blur gate reads (docs/model-history.md,
"A lower score bar where the scan is blurred, and a gate that tells").

On a blurred scan the refiner's score bar drops true nuclei; a lower bar wins most of them back but
costs precision on sharp tiles, so the prompter lowers it only on tiles this statistic calls
blurred. The statistic is the ratio of second- to first-derivative energy of the grey tile,
std(Laplacian) / std(|gradient|): contrast and stain cancel out, and blur lowers it.

The prompter service computes the same number (services/prompter/src/sharpness.ts), rule for rule:
grey = 0.299 R + 0.587 G + 0.114 B on the tile's RGB (0-255, recovered from the normalised pixels);
the 5-point Laplacian and the Sobel gradient magnitude / 8 with the edge pixel repeated outside the
tile; their population standard deviations over the pixels whose 3 x 3 neighbourhood holds no white
padding (every channel >= 254.5: the gateway pads small images with white, and a white edge is a
sharp one). With fewer than a quarter of the pixels left, the tile is not judged: +inf.
"""

from typing import Sequence

import numpy as np

GREY_WEIGHTS = (0.299, 0.587, 0.114)
PADDING_LEVEL = 254.5
MIN_COUNTED_FRACTION = 0.25


def tile_sharpness(rgb: np.ndarray) -> float:
    """Sharpness of an RGB tile [H, W, 3] (0-255): lower is blurrier; +inf when mostly padding."""
    rgb = np.asarray(rgb, dtype=np.float64)
    grey = rgb @ np.array(GREY_WEIGHTS)
    g = np.pad(grey, 1, mode="edge")
    centre = g[1:-1, 1:-1]
    up, down, left, right = g[:-2, 1:-1], g[2:, 1:-1], g[1:-1, :-2], g[1:-1, 2:]
    laplacian = up + down + left + right - 4 * centre
    # Sobel: the difference across one axis, smoothed [1, 2, 1] along the other.
    dx = (g[:-2, 2:] + 2 * g[1:-1, 2:] + g[2:, 2:]) - (g[:-2, :-2] + 2 * g[1:-1, :-2] + g[2:, :-2])
    dy = (g[2:, :-2] + 2 * g[2:, 1:-1] + g[2:, 2:]) - (g[:-2, :-2] + 2 * g[:-2, 1:-1] + g[:-2, 2:])
    gradient = np.hypot(dx, dy) / 8.0
    padding = np.pad((rgb >= PADDING_LEVEL).all(-1), 1, mode="edge")
    near_padding = np.zeros(grey.shape, dtype=bool)
    for oy in range(3):
        for ox in range(3):
            near_padding |= padding[oy : oy + grey.shape[0], ox : ox + grey.shape[1]]
    counted = ~near_padding
    if counted.sum() < MIN_COUNTED_FRACTION * counted.size:
        return float("inf")
    return float(laplacian[counted].std() / max(gradient[counted].std(), 1e-6))


def normalised_tile_sharpness(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> float:
    """`tile_sharpness` of a normalised tile [3, H, W] ((rgb - mean) / std per channel, 0-255 scale)."""
    image = np.asarray(image, dtype=np.float64)
    rgb = image * np.asarray(std, dtype=np.float64)[:, None, None] + np.asarray(mean, dtype=np.float64)[:, None, None]
    return tile_sharpness(rgb.transpose(1, 2, 0))
