"""The Python reference pipeline applies the services' rules: point NMS ranked by foreground (the
prompter), overlap resolution with hole filling, one component per instance, the kept-fraction and
minimum-area rules (the gateway). Hand-made cases; `fixtures/overlap_cases.json` holds the same
cases with their expected label maps, so the TypeScript side can check `resolveOverlaps` on them."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cfrsam.inference import keep_component, point_nms, resolve_overlaps
from cfrsam.prompt_learner import decode_prompts

FIXTURE = Path(__file__).parent / "fixtures" / "overlap_cases.json"


def test_point_nms_keeps_the_higher_score_and_breaks_ties_by_order():
    pts = np.array([[10.0, 10.0], [13.0, 10.0], [30.0, 30.0], [33.0, 30.0]])
    assert point_nms(pts, np.array([0.5, 0.9, 0.7, 0.7]), 5.0).tolist() == [1, 2]
    # Exactly `radius` apart is not a conflict (the prompter drops only d < radius).
    assert point_nms(pts[:2], np.array([0.9, 0.5]), 3.0).tolist() == [0, 1]
    assert point_nms(pts, np.array([0.1, 0.2, 0.3, 0.4]), 0.0).tolist() == [3, 2, 1, 0]


def test_decode_prompts_reports_foreground():
    # Anchor 0: p(class 0) = 0.5, p(class 1) = 0.1, p(bg) = 0.4 -> foreground 0.6, score 0.5.
    logits = torch.log(torch.tensor([[[0.5, 0.1, 0.4], [0.05, 0.05, 0.9]]]))
    points = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    det = decode_prompts(points, logits, 0.3)[0]
    assert det["anchor_index"].tolist() == [0]
    assert det["foreground"].tolist() == pytest.approx([0.6])
    assert det["scores"].tolist() == pytest.approx([0.5])


def test_keep_component_prefers_the_prompt_then_the_largest():
    m = np.zeros((5, 9), dtype=bool)
    m[1:4, 0:2] = True  # 6 px
    m[1:3, 5:9] = True  # 8 px
    assert keep_component(m, (0.5, 1.5)).sum() == 6
    assert keep_component(m, (3.5, 0.5)).sum() == 8  # on background: the largest
    # Diagonal neighbours are separate components (4-connectivity).
    d = np.eye(3, dtype=bool)
    assert keep_component(d, None).sum() == 1


def _cases():
    """(name, masks [N, W, W], origins [N, 2], scores [N], prompts [N, 2], frame size)."""
    cases = []
    w = 16
    # Two discs overlapping a little: the lower score loses the shared pixels but survives.
    yy, xx = np.mgrid[0:w, 0:w]
    a = (xx - 7.5) ** 2 + (yy - 7.5) ** 2 <= 25
    masks = np.stack([a, a])
    cases.append(
        (
            "small-overlap",
            masks,
            np.array([[0, 0], [6, 0]]),
            np.array([0.9, 0.8]),
            np.array([[7.5, 7.5], [13.5, 7.5]]),
            (16, 32),
        )
    )
    # The same, mostly covered: the lower score keeps < 50% and is dropped; the higher one has a hole
    # (filled) and a stray fragment (dropped).
    ring = a.copy()
    ring[7:9, 7:9] = False
    ring[0, 15] = True
    cases.append(
        (
            "mostly-covered",
            np.stack([ring, a]),
            np.array([[0, 0], [2, 0]]),
            np.array([0.9, 0.8]),
            np.array([[7.5, 4.5], [9.5, 7.5]]),
            (16, 32),
        )
    )
    # Tiny instance (3 px) dropped by the minimum area; equal scores resolved in input order.
    tiny = np.zeros((w, w), dtype=bool)
    tiny[0, 0:3] = True
    cases.append(
        (
            "tiny-and-ties",
            np.stack([a, tiny, a]),
            np.array([[16, 0], [0, 0], [16, 0]]),
            np.array([0.5, 0.9, 0.5]),
            np.array([[23.5, 7.5], [1.5, 0.5], [23.5, 7.5]]),
            (16, 32),
        )
    )
    # A cut leaves two pieces after subtraction: the one under the prompt stays.
    bar = np.zeros((w, w), dtype=bool)
    bar[6:10, 0:16] = True
    wall = np.zeros((w, w), dtype=bool)
    wall[0:16, 6:8] = True
    cases.append(
        (
            "split-by-higher",
            np.stack([wall, bar]),
            np.array([[0, 0], [0, 0]]),
            np.array([0.9, 0.5]),
            np.array([[6.5, 2.5], [12.5, 7.5]]),
            (16, 16),
        )
    )
    return cases


def test_resolve_overlaps_rules():
    results = {name: resolve_overlaps(m, o, s, p, size) for name, m, o, s, p, size in _cases()}
    disc = int(_cases()[0][1][0].sum())
    labels, accepted = results["small-overlap"]
    assert accepted.tolist() == [0, 1]
    assert (labels == 1).sum() == disc and 0.5 * disc <= (labels == 2).sum() < disc
    labels, accepted = results["mostly-covered"]
    assert accepted.tolist() == [0]
    assert labels[7, 7] == 1 and labels[0, 15] == 0  # hole filled, fragment gone
    labels, accepted = results["tiny-and-ties"]
    assert accepted.tolist() == [0]  # 3 px < 4 px; candidate 2 duplicates candidate 0
    labels, accepted = results["split-by-higher"]
    assert accepted.tolist() == [0, 1]
    assert (labels == 2).sum() == 4 * 8 and labels[7, 12] == 2 and labels[7, 2] == 0


def _fixture():
    out = []
    for name, m, o, s, p, size in _cases():
        labels, accepted = resolve_overlaps(m, o, s, p, size)
        out.append(
            {
                "name": name,
                "frame": {"height": size[0], "width": size[1]},
                "candidates": [
                    {
                        "x0": int(o[i][0]),
                        "y0": int(o[i][1]),
                        "width": int(m.shape[2]),
                        "height": int(m.shape[1]),
                        "mask": m[i].astype(int).ravel().tolist(),
                        "score": float(s[i]),
                        "prompt": {"x": float(p[i][0]), "y": float(p[i][1])},
                    }
                    for i in range(len(m))
                ],
                "options": {"minKeptFraction": 0.5, "minAreaPx": 4},
                "expected": {"accepted": accepted.tolist(), "labels": labels.ravel().tolist()},
            }
        )
    return {
        "about": "resolveOverlaps cases: candidate masks are row-major 0/1 of width x height at (x0, y0); "
        "expected.labels is the row-major frame with id k+1 for the k-th accepted candidate "
        "(acceptance order = decreasing score, ties by input order). Written by "
        "model/tests/test_inference.py (CFRSAM_WRITE_FIXTURES=1).",
        "cases": out,
    }


def test_shared_fixture_is_current():
    import os

    fixture = _fixture()
    if os.environ.get("CFRSAM_WRITE_FIXTURES"):
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(fixture) + "\n")
    assert json.loads(FIXTURE.read_text()) == fixture


def test_segment_tile_thresholds_masks_at_the_configs_logit():
    """The Python reference applies the config's mask threshold, as the decoder service does."""
    from cfrsam import build_cfr_sam
    from cfrsam.inference import segment_tile

    model = build_cfr_sam("tiny", input_size=64, window=32, seed=3)
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    points = np.array([[20.0, 20.0], [44.0, 40.0]], dtype=np.float32)
    areas = {}
    for threshold in (-0.5, 0.5):
        model.config.mask_threshold = threshold
        labels, _ = segment_tile(model, image, points=points)
        explicit, _ = segment_tile(model, image, points=points, mask_threshold=threshold)
        assert np.array_equal(labels, explicit)
        areas[threshold] = int((labels > 0).sum())
    assert areas[-0.5] >= areas[0.5]


def test_negative_prompts_take_the_nearest_neighbours_within_the_radius():
    from cfrsam.inference import negative_prompts

    points = np.array([[10, 10], [20, 10], [10, 35], [100, 100]], dtype=np.float32)
    coords, labels = negative_prompts(points, 2, 26.0)
    assert coords.shape == (4, 3, 2)
    # Point 0: its neighbours at 10 px (1) and 25 px (2); point 3 has none within 26 px.
    assert (
        labels.tolist()[0] == [1.0, 0.0, 0.0]
        and coords[0, 1].tolist() == [20, 10]
        and coords[0, 2].tolist() == [10, 35]
    )
    assert labels.tolist()[3] == [1.0, -1.0, -1.0] and (coords[3] == [100, 100]).all()
    one, one_labels = negative_prompts(points, 0, 26.0)
    assert one.shape == (4, 1, 2) and (one_labels == 1).all()
