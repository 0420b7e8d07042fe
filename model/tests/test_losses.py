"""Stage-2 losses: values on hand-made cases, boundary targets, windowed targets, and that the
losses train a model."""

import pytest
import torch

from cfrsam.losses import (
    boundary_loss,
    boundary_targets,
    cfr_sam_loss,
    crop_windows,
    dice_loss,
    iou_prediction_loss,
    mask_iou,
    mask_loss,
    sigmoid_focal_loss,
)
from cfrsam.modeling.bgmr import BGMR

torch.set_num_threads(1)


def square(size: int = 12, lo: int = 3, hi: int = 9) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, lo:hi, lo:hi] = 1
    return mask


def disk(size: int, cx: float, cy: float, r: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r).float()


def test_boundary_targets_on_a_square():
    mask = square()  # 6x6 square at rows/cols 3..8
    band = boundary_targets(mask, width=2)
    assert band.shape == mask.shape
    # one pixel outside and one inside: the 8x8 ring minus the 4x4 core
    assert band.sum().item() == 8 * 8 - 4 * 4
    assert band[0, 2, 2] == 1 and band[0, 3, 3] == 1 and band[0, 4, 4] == 0 and band[0, 1, 1] == 0
    inner = boundary_targets(mask, width=1)
    assert inner.sum().item() == 6 * 6 - 4 * 4
    assert torch.equal(inner, inner * mask)  # the inner contour lies inside the mask
    assert boundary_targets(mask.unsqueeze(1), width=2).shape == (1, 1, 12, 12)
    # A nucleus cut by the frame edge gets no boundary along the edge.
    edge = square(lo=0, hi=6)
    band = boundary_targets(edge, width=2)
    assert band[0, 0, :4].sum() == 0 and band[0, :4, 0].sum() == 0
    assert band[0, 0, 5] == 1 and band[0, 5, 0] == 1
    assert boundary_targets(torch.zeros(2, 8, 8)).sum() == 0


def test_focal_and_dice_on_perfect_and_wrong_predictions():
    target = square()
    perfect = (target * 2 - 1) * 20
    assert sigmoid_focal_loss(perfect, target) < 1e-6
    assert dice_loss(perfect, target) < 1e-3
    assert sigmoid_focal_loss(-perfect, target) > 1.0
    assert dice_loss(-perfect, target) > 0.9
    # Empty target, empty prediction: no loss thanks to the smoothing term.
    assert dice_loss(torch.full((1, 8, 8), -20.0), torch.zeros(1, 8, 8)) < 1e-3
    per_mask = sigmoid_focal_loss(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8), reduction="none")
    assert per_mask.shape == (3,)


def test_mask_iou_and_iou_prediction_loss():
    target = square()  # 36 pixels
    logits = torch.full((1, 12, 12), -1.0)
    logits[:, 3:9, 3:6] = 1.0  # half of the square
    assert mask_iou(logits, target).item() == pytest.approx(0.5)
    assert mask_iou(torch.full((1, 4, 4), -1.0), torch.zeros(1, 4, 4)).item() == 1.0
    assert iou_prediction_loss(logits, target, torch.tensor([0.5])).item() == pytest.approx(0.0)
    assert iou_prediction_loss(logits, target, torch.tensor([0.9])).item() == pytest.approx(0.16)


def test_mask_loss_is_the_weighted_sum():
    torch.manual_seed(0)
    logits, target, iou = torch.randn(2, 16, 16), (torch.rand(2, 16, 16) > 0.5).float(), torch.rand(2)
    expected = (
        20 * sigmoid_focal_loss(logits, target) + dice_loss(logits, target) + iou_prediction_loss(logits, target, iou)
    )
    assert mask_loss(logits, target, iou).item() == pytest.approx(expected.item(), rel=1e-6)
    custom = mask_loss(logits, target, None, focal_weight=1.0, dice_weight=0.0)
    assert custom.item() == pytest.approx(sigmoid_focal_loss(logits, target).item(), rel=1e-6)


def test_boundary_loss_weights_the_rare_positives():
    target = boundary_targets(disk(32, 16, 16, 8).unsqueeze(0))
    missed = torch.full_like(target, -3.0)  # everything called background
    false_alarm = torch.full_like(target, 3.0)  # everything called boundary
    # Missing every boundary pixel costs about as much as flagging every background pixel.
    balanced_miss = boundary_loss(missed, target, dice_weight=0.0)
    balanced_alarm = boundary_loss(false_alarm, target, dice_weight=0.0)
    assert 0.5 < (balanced_miss / balanced_alarm).item() < 2.0
    plain_miss = boundary_loss(missed, target, dice_weight=0.0, pos_weight=1.0)
    assert plain_miss < 0.5 * balanced_miss


def test_losses_decrease_when_optimising_free_logits():
    target = disk(32, 14, 17, 7).unsqueeze(0).repeat(2, 1, 1)
    edges = boundary_targets(target)
    logits = torch.zeros(2, 32, 32, requires_grad=True)
    edge_logits = torch.zeros(2, 32, 32, requires_grad=True)
    iou = torch.full((2,), 0.5, requires_grad=True)
    optimiser = torch.optim.Adam([logits, edge_logits, iou], lr=0.1)
    history = []
    for _ in range(40):
        loss = mask_loss(logits, target, iou) + boundary_loss(edge_logits, edges)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert history[-1] < 0.2 * history[0]
    assert mask_iou(logits, target).min() > 0.95


def test_cfr_sam_loss_windowed_uses_the_cropped_targets():
    torch.manual_seed(0)
    size, window = 32, 16
    targets = torch.stack([disk(size, 10, 12, 5), disk(size, 22, 20, 6)])
    origins = torch.tensor([[4, 4], [12, 12]])
    coarse, refined, boundary = torch.randn(2, 8, 8), torch.randn(2, window, window), torch.randn(2, window, window)
    iou = torch.rand(2)
    out = cfr_sam_loss(coarse, refined, boundary, targets, iou, lambda_b=0.5, window_origin=origins)
    assert set(out) == {"loss", "coarse", "refined", "boundary", "iou"}
    cropped = torch.stack([targets[p, y : y + window, x : x + window] for p, (x, y) in enumerate(origins.tolist())])
    assert torch.equal(crop_windows(targets, origins, window), cropped)
    edges = crop_windows(boundary_targets(targets), origins, window)
    coarse_targets = torch.nn.functional.avg_pool2d(targets.unsqueeze(1), 4).squeeze(1)
    # By default the coarse mask is scored inside the refinement window (at 1/4 resolution).
    coarse_in = crop_windows(coarse, origins, window, scale=4, shared=False)
    coarse_targets_in = crop_windows(coarse_targets, origins, window, scale=4, shared=False)
    expected = (
        mask_loss(coarse_in, coarse_targets_in)
        + mask_loss(refined, cropped, iou)
        + 0.5 * boundary_loss(boundary, edges)
    )
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    whole = cfr_sam_loss(
        coarse, refined, boundary, targets, iou, lambda_b=0.5, window_origin=origins, coarse_in_window=False
    )
    expected_whole = (
        mask_loss(coarse, coarse_targets) + mask_loss(refined, cropped, iou) + 0.5 * boundary_loss(boundary, edges)
    )
    assert whole["loss"].item() == pytest.approx(expected_whole.item(), rel=1e-5)
    with pytest.raises(ValueError):
        cfr_sam_loss(coarse, refined, boundary, targets, iou)
    # Full-frame shapes, logits upsampled instead of targets downsampled, and no prompts at all.
    full = cfr_sam_loss(
        coarse,
        torch.randn(2, size, size),
        torch.randn(2, size, size),
        targets,
        iou,
        coarse_targets="upsample",
        iou_on="coarse",
    )
    assert torch.isfinite(full["loss"])
    empty = cfr_sam_loss(coarse[:0], refined[:0], boundary[:0], targets[:0], iou[:0], window_origin=origins[:0])
    assert empty["loss"].item() == 0.0


def test_cfr_sam_loss_trains_bgmr_in_window_mode():
    torch.manual_seed(0)
    size, window = 32, 16
    bgmr = BGMR(embed_dim=16, coarse_dim=5, channels=8, boundary_channels=8)
    embedding, image = torch.randn(1, 16, 2, 2), torch.randn(1, 3, size, size)
    targets = torch.stack([disk(size, 12, 12, 5), disk(size, 20, 19, 4)])
    image = image + 2 * targets.sum(0)  # the nuclei are visible in the pixels
    coarse_logits = torch.zeros(2, 8, 8, requires_grad=True)
    coarse_features = torch.randn(2, 4, 8, 8)
    origins = torch.tensor([[4, 4], [12, 12]])
    iou = torch.full((2,), 0.5, requires_grad=True)
    optimiser = torch.optim.Adam(list(bgmr.parameters()) + [coarse_logits, iou], lr=0.01)
    history = []
    for _ in range(15):
        semantic, boundary_features = bgmr.image_features(embedding, image)
        features = torch.cat((coarse_features, coarse_logits.unsqueeze(1)), dim=1)
        refined, boundary = bgmr.refine(semantic, boundary_features, features, origins, window)
        loss = cfr_sam_loss(coarse_logits, refined, boundary, targets, iou, window_origin=origins)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert history[-1] < 0.7 * history[0]
