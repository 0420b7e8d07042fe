"""The Python reference metrics: AJI's edge cases as the services' evaluation defines them
(packages/nuclei/src/metrics/aji.ts), so PyTorch validation and `cfrsam evaluate` average alike."""
import math

import numpy as np

from cfrsam.metrics import MetricAccumulator, aji


def _square(frame, label, x0, y0, size):
    frame[y0 : y0 + size, x0 : x0 + size] = label
    return frame


def test_aji_by_hand():
    gt = _square(np.zeros((8, 8), np.int32), 1, 0, 0, 4)  # 16 px
    pred = _square(np.zeros((8, 8), np.int32), 1, 0, 0, 2)  # 4 px inside it
    pred = _square(pred, 2, 6, 6, 2)  # 4 px touching nothing: only in the union
    assert aji(gt, pred) == 4 / (16 + 4)


def test_aji_edge_cases_match_the_services():
    empty = np.zeros((8, 8), np.int32)
    one = _square(np.zeros((8, 8), np.int32), 1, 0, 0, 4)
    assert math.isnan(aji(empty, empty))  # undefined: left out of the mean
    assert aji(empty, one) == 0.0 and aji(one, empty) == 0.0


def test_an_image_empty_in_both_maps_is_left_out_of_the_aji_mean():
    acc = MetricAccumulator(num_classes=1)
    one = _square(np.zeros((8, 8), np.int32), 1, 0, 0, 4)
    half = _square(np.zeros((8, 8), np.int32), 1, 0, 0, 2)
    acc.add(one, half)  # AJI 4 / 16
    acc.add(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32))
    summary = acc.summary()
    assert summary["aji"] == 0.25 and summary["images"] == 2
