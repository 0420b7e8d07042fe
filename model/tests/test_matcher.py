"""Hungarian matching of anchors to centroids against brute force."""

import itertools

import numpy as np
import pytest
import torch

from cfrsam.prompt_learner import HungarianMatcher, match_anchors
from cfrsam.prompt_learner.matcher import match_cost


def brute_force_best(cost: np.ndarray) -> float:
    """Minimal total cost over all injective assignments of min(A, N) pairs."""
    a, n = cost.shape
    best = np.inf
    if n <= a:
        for rows in itertools.permutations(range(a), n):
            best = min(best, sum(cost[r, j] for j, r in enumerate(rows)))
    else:
        for cols in itertools.permutations(range(n), a):
            best = min(best, sum(cost[i, c] for i, c in enumerate(cols)))
    return best


def random_case(rng, a, n, k=3, unknown=False):
    logits = rng.normal(size=(a, k + 1)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    points = rng.uniform(0, 32, size=(a, 2))
    centroids = rng.uniform(0, 32, size=(n, 2))
    classes = rng.integers(0, k, size=n)
    if unknown and n:
        classes[rng.integers(0, n)] = -1
    return probs, points, centroids, classes


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    a, n = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    probs, points, centroids, classes = random_case(rng, a, n, unknown=seed % 3 == 0)
    rows, cols = match_anchors(probs, points, centroids, classes)
    assert len(rows) == len(cols) == min(a, n)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    cost = match_cost(probs, points, centroids, classes)
    assert cost[rows, cols].sum() == pytest.approx(brute_force_best(cost), abs=1e-9)


def test_cost_is_negated_paper_score():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])  # K = 2
    points = np.array([[0.0, 0.0], [3.0, 4.0]])
    centroids = np.array([[0.0, 0.0]])
    cost = match_cost(probs, points, centroids, np.array([1]))
    # score = p(class) - 0.1 * distance in pixels
    assert cost[:, 0] == pytest.approx([-(0.2 - 0.0), -(0.1 - 0.1 * 5.0)])
    unknown = match_cost(probs, points, centroids, np.array([-1]))
    assert unknown[:, 0] == pytest.approx([-(0.9 - 0.0), -(0.2 - 0.5)])


def test_nearest_anchor_wins_when_classes_tie():
    probs = np.full((3, 2), 0.5)
    points = np.array([[0.0, 0.0], [10.0, 10.0], [20.0, 0.0]])
    centroids = np.array([[19.0, 1.0], [1.0, 1.0]])
    rows, cols = match_anchors(probs, points, centroids, np.array([0, 0]))
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}


def test_class_confidence_breaks_near_ties():
    probs = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])
    points = np.array([[5.0, 5.0], [5.5, 5.0]])
    centroids = np.array([[5.2, 5.0], [5.3, 5.0]])
    rows, cols = match_anchors(probs, points, centroids, np.array([1, 0]))
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def test_no_ground_truth_and_more_nuclei_than_anchors():
    probs, points, _, _ = random_case(np.random.default_rng(0), 4, 0)
    rows, cols = match_anchors(probs, points, np.zeros((0, 2)), np.zeros(0, dtype=np.int64))
    assert rows.shape == cols.shape == (0,)
    probs, points, centroids, classes = random_case(np.random.default_rng(1), 2, 5)
    rows, cols = match_anchors(probs, points, centroids, classes)
    assert len(rows) == 2


def test_batched_matcher_on_tensors():
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 4)
    points = torch.rand(2, 6, 2) * 32
    centroids = [torch.rand(3, 2) * 32, torch.zeros(0, 2)]
    classes = [torch.tensor([0, 2, 1]), torch.zeros(0, dtype=torch.long)]
    matches = HungarianMatcher()(points, logits, centroids, classes)
    assert len(matches) == 2
    rows, cols = matches[0]
    assert rows.dtype == torch.int64 and len(rows) == 3
    expected = match_anchors(
        logits[0].double().softmax(-1).numpy(), points[0].double().numpy(), centroids[0].numpy(), classes[0].numpy()
    )
    assert rows.tolist() == expected[0].tolist() and cols.tolist() == expected[1].tolist()
    assert matches[1][0].numel() == 0
