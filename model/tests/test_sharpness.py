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


# The prompter service computes the same statistic (services/prompter/src/sharpness.ts); this
# fixture, read by its tests, holds small tiles and the values the reference gives them.
FIXTURE = Path(__file__).parent / "fixtures" / "sharpness_cases.json"


def _texture(size: int, blur: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grey = ndimage.gaussian_filter(rng.uniform(0, 255, (size, size)), 1.0)
    if blur:
        grey = ndimage.gaussian_filter(grey, blur)
    return np.clip(np.stack([grey, grey * 0.6 + 60, grey * 0.8 + 40], axis=-1).round(), 0, 255)


def _cases():
    sharp, blurred = _texture(24, 0), _texture(24, 2.0)
    padded = np.full((24, 24, 3), 255.0)
    padded[:, :15] = blurred[:, :15]  # a blurred image narrower than the tile: white padding on the right
    mostly_padding = np.full((24, 24, 3), 255.0)
    mostly_padding[:8, :8] = sharp[:8, :8]
    flat = np.full((24, 24, 3), 200.0)
    return {"sharp": sharp, "blurred": blurred, "padded": padded, "mostly-padding": mostly_padding, "flat": flat}


def _fixture():
    from cfrsam.prompt_learner.sharpness import tile_sharpness

    cases = []
    for name, rgb in _cases().items():
        value = tile_sharpness(rgb)
        cases.append(
            {
                "name": name,
                "width": rgb.shape[1],
                "height": rgb.shape[0],
                "rgb": rgb.astype(np.uint8).ravel().tolist(),
                "sharpness": value if np.isfinite(value) else None,
            }
        )
    return {
        "about": "tile_sharpness cases: rgb is row-major 8-bit RGB of width x height; sharpness is the "
        "reference's value (null: not judged, +inf). Written by model/tests/test_sharpness.py "
        "(CFRSAM_WRITE_FIXTURES=1).",
        "cases": cases,
    }


def test_shared_fixture_is_current():
    import json
    import os

    fixture = _fixture()
    if os.environ.get("CFRSAM_WRITE_FIXTURES"):
        FIXTURE.write_text(json.dumps(fixture) + "\n")
    assert json.loads(FIXTURE.read_text()) == fixture


def test_white_padding_is_not_an_edge_and_a_mostly_padded_tile_is_not_judged():
    from cfrsam.prompt_learner.sharpness import tile_sharpness

    cases = _cases()
    padded = tile_sharpness(cases["padded"])
    alone = tile_sharpness(cases["blurred"][:, :14])  # the image's own pixels, away from the padding
    assert abs(padded - alone) < 0.05 * alone
    # Counted, the white edge would have made the blurred image look sharper than it is.
    grey = cases["padded"] @ np.array([0.299, 0.587, 0.114])
    gradient = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1)) / 8.0
    assert ndimage.laplace(grey).std() / gradient.std() > 1.2 * alone
    assert tile_sharpness(cases["mostly-padding"]) == float("inf")
    assert tile_sharpness(cases["blurred"]) < tile_sharpness(cases["sharp"])
    assert tile_sharpness(cases["flat"]) == 0.0
