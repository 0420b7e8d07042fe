"""diagnostics/sharpness.py: the statistic falls with blur and ignores contrast; the cut separates."""

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "diagnostics"))

import sharpness  # noqa: E402


def test_blur_lowers_the_statistic_and_contrast_does_not_move_it():
    rng = np.random.default_rng(0)
    grey = ndimage.gaussian_filter(rng.uniform(0, 255, (128, 128)), 1.0)
    rgb = np.stack([grey] * 3, axis=-1)
    sharp = sharpness.sharpness(rgb)
    blurred = [sharpness.sharpness(ndimage.gaussian_filter(rgb, (s, s, 0))) for s in (1.0, 2.5)]
    assert sharp > blurred[0] > blurred[1]
    assert abs(sharpness.sharpness(rgb * 0.5 + 40) - sharp) < 1e-9 * max(sharp, 1)


def test_best_threshold_separates_separable_values():
    t, accuracy = sharpness.best_threshold([1.5, 2.0, 2.2], [0.6, 0.8, 1.1])
    assert accuracy == 1.0 and 1.1 < t <= 1.5
    t, accuracy = sharpness.best_threshold([1.0, 2.0], [1.5, 0.5])
    assert accuracy == 0.75
