"""The point refiner: its crops, its training targets, that it learns, and the model and bundle
that carry it (detect_points and point_refiner.onnx)."""
import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch

from cfrsam import build_cfr_sam
from cfrsam.export import export_bundle
from cfrsam.export.bundle import check_bundle
from cfrsam.inference import detect_points, point_nms
from cfrsam.prompt_learner import PointRefiner, PointRefinerConfig
from cfrsam.prompt_learner.point_refiner import mix_class_probabilities
from cfrsam.train import common
from cfrsam.train.refiner import attach, placement, train, training_batch


def test_crops_put_the_points_pixel_at_the_centre_and_read_zeros_outside():
    refiner = PointRefiner(PointRefinerConfig(crop=16, width=8, stem_width=4, dilations=(1,)))
    image = torch.zeros(2, 3, 32, 32)
    image[1, :, 20, 9] = 5.0  # row 20, column 9 of image 1
    crops = refiner.crops(image, torch.tensor([[9.7, 20.2], [0.3, 0.4]]), torch.tensor([1, 1]))
    assert crops.shape == (2, 3, 16, 16)
    assert (crops[0, 0] == 5.0).nonzero().tolist() == [[8, 8]]
    # A point at the corner: the crop's top-left quarter lies outside the image and reads zero.
    assert crops[1, :, :8, :8].abs().sum() == 0


def test_training_targets_are_the_centroid_of_the_nucleus_under_the_moved_point():
    instances = torch.zeros(1, 32, 32, dtype=torch.long)
    instances[0, 2:10, 2:10] = 1  # centroid (6, 6)
    instances[0, 20:30, 20:30] = 2  # centroid (25, 25)
    batch = {
        "image": torch.zeros(1, 3, 32, 32),
        "instances": instances,
        "centroids": [torch.tensor([[6.0, 6.0], [25.0, 25.0]])],
    }
    rng = np.random.default_rng(0)
    batch["classes"] = [torch.tensor([2, -1])]
    points, index, targets, classes = training_batch(batch, per_image=2, jitter=30.0, rng=rng)
    assert index.tolist() == [0, 0]
    # Each point carries its target nucleus' class (-1: unknown).
    for target, cls in zip(targets.tolist(), classes.tolist()):
        assert cls == (2 if target == [6.0, 6.0] else -1)
    for point, target in zip(points.numpy(), targets.numpy()):
        under = int(instances[0, int(point[1]), int(point[0])])
        if under:
            assert target.tolist() == [[6.0, 6.0], [25.0, 25.0]][under - 1]
        else:  # on no nucleus: the one it was drawn from
            assert target.tolist() in ([6.0, 6.0], [25.0, 25.0])


def _discs(count: int, size: int = 64, seed: int = 0):
    """Synthetic tiles: dark discs (nuclei) on a light background, with their label maps."""
    rng = np.random.default_rng(seed)
    items = []
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(count):
        image = np.ones((3, size, size), dtype=np.float32)
        labels = np.zeros((size, size), dtype=np.int64)
        centroids = []
        for cx, cy in ((16, 16), (46, 20), (20, 46), (46, 46)):
            cx, cy, r = cx + rng.uniform(-4, 4), cy + rng.uniform(-4, 4), rng.uniform(5, 8)
            disc = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
            image[:, disc] = -1.0
            labels[disc] = len(centroids) + 1
            ys, xs = np.nonzero(disc)
            centroids.append([xs.mean() + 0.5, ys.mean() + 0.5])
        items.append(
            {
                "image": torch.from_numpy(image),
                "instances": torch.from_numpy(labels),
                "foreground": torch.from_numpy((labels > 0).astype(np.float32)),
                "centroids": torch.tensor(centroids, dtype=torch.float32),
            }
        )
    return items


def test_the_refiner_learns_to_move_points_onto_centres(tmp_path):
    torch.manual_seed(0)
    train_set = _discs(8)
    rng = np.random.default_rng(1)
    tiles = []
    for item in _discs(4, seed=5):
        centroids = item["centroids"].numpy()
        points = (centroids + rng.normal(0, 3, centroids.shape)).astype(np.float32)
        tiles.append((item["image"][None], item["instances"].numpy(), centroids, points, None, None))
    args = argparse.Namespace(
        batch_size=4, per_image=4, jitter=4.0, lr=3e-3, steps=120, val_every=120, seed=0, bf16=False,
        heat_sigma=1.5, distance_weight=0.1, radius=12.0,
    )  # fmt: skip
    refiner = PointRefiner(PointRefinerConfig(crop=32, width=16, stem_width=8, dilations=(1, 2)))
    train(args, refiner, train_set, tiles, common.RunLog(tmp_path / "log.jsonl"), tmp_path)
    refiner.eval()
    served, refined = placement(tiles, refiner, radius=12.0)
    assert refined["mean"] < 0.6 * served["mean"], (served, refined)
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert record["event"] == "val" and record["step"] == 120
    assert (tmp_path / "refiner.pt").is_file()


@pytest.fixture(scope="module")
def refined_model():
    base = build_cfr_sam("tiny", input_size=64, window=32, seed=3)
    refiner = PointRefiner(PointRefinerConfig(crop=16, width=8, stem_width=4, dilations=(1,)))
    torch.manual_seed(1)
    for p in refiner.parameters():
        torch.nn.init.normal_(p, std=0.3)
    checkpoint = {"config": base.config.to_dict(), "model": base.state_dict(), "training": None, "metrics": None}
    return build_cfr_sam(None, checkpoint=attach(checkpoint, refiner, {"note": "test"}, {"steps": 0}))


def test_detect_points_refines_the_kept_points_then_merges_converged_ones(refined_model):
    model = refined_model
    assert model.point_refiner is not None
    image = torch.randn(1, 3, 64, 64)
    points, classes, scores, foreground = detect_points(model, image, min_foreground=0.0, nms_radius=4.0)
    assert len(points) == len(classes) == len(scores) == len(foreground) > 0
    # The same as refining the unrefined detections, then NMS at the refiner's radius.
    plain = model.point_refiner
    model.point_refiner = None
    try:
        raw, raw_classes, _, raw_foreground = detect_points(model, image, min_foreground=0.0, nms_radius=4.0)
    finally:
        model.point_refiner = plain
    with torch.no_grad():
        moved = model.refine_points(image, torch.from_numpy(raw)).numpy()
    keep = point_nms(moved, raw_foreground, plain.cfg.nms_radius)
    np.testing.assert_allclose(points, moved[keep], atol=1e-5)
    assert classes.tolist() == raw_classes[keep].tolist()
    assert (points >= 0).all() and (points <= 64).all()


def test_a_bundle_with_a_refiner_exports_its_graph_and_checks(refined_model, tmp_path):
    manifest = export_bundle(refined_model, str(tmp_path / "b"), name="t", include_full=False)
    assert manifest["graphs"]["point_refiner"]["file"] == "point_refiner.onnx"
    assert manifest["prompter"]["refined_nms_radius"] == 4.0
    assert manifest["provenance"]["config"]["point_refiner"]["crop"] == 16
    assert check_bundle(str(tmp_path / "b"), verbose=False) == []
    fixture = json.loads((tmp_path / "b" / "parity" / "point_refiner.json").read_text())
    assert fixture["inputs"]["image_index"]["dtype"] == "int64"
    assert fixture["outputs"]["refined_points"]["dims"][1] == 2
    # A refiner without the score head reports every point as on a nucleus.
    assert fixture["outputs"]["point_scores"]["dims"] == fixture["outputs"]["refined_points"]["dims"][:1]
    assert manifest["prompter"]["min_point_score"] == 0.0


@pytest.fixture(scope="module")
def scored_model():
    base = build_cfr_sam("tiny", input_size=64, window=32, seed=3)
    cfg = PointRefinerConfig(
        crop=16, width=8, stem_width=4, dilations=(1,), score_head=True, min_score=0.5,
        num_classes=base.config.num_classes, class_weight=0.5,
    )  # fmt: skip
    refiner = PointRefiner(cfg)
    torch.manual_seed(2)
    for p in refiner.parameters():
        torch.nn.init.normal_(p, std=0.3)
    checkpoint = {"config": base.config.to_dict(), "model": base.state_dict(), "training": None, "metrics": None}
    return build_cfr_sam(None, checkpoint=attach(checkpoint, refiner, {"note": "test"}, {"steps": 0}))


def test_detect_points_drops_the_points_the_score_head_puts_on_no_nucleus_and_mixes_classes(scored_model):
    model = scored_model
    image = torch.randn(1, 3, 64, 64)
    refiner = model.point_refiner
    model.point_refiner = None
    try:
        raw, _, _, raw_foreground, raw_probs = detect_points(model, image, 0.0, 4.0, class_probs=True)
    finally:
        model.point_refiner = refiner
    with torch.no_grad():
        moved, scores, refiner_probs = model.refine_and_score_points(image, torch.from_numpy(raw))
    moved, scores = moved.numpy(), scores.numpy()
    assert ((scores > 0) & (scores < 1)).all()
    assert refiner_probs.shape == (len(raw), model.config.num_classes)
    # The bar at the random head's median score: points on both sides, or the test shows nothing.
    bar = float(np.median(scores))
    refiner.cfg = dataclasses.replace(refiner.cfg, min_score=bar)
    assert 0 < (scores >= bar).sum() < len(scores)
    points, classes, confidence, foreground, probs = detect_points(model, image, 0.0, 4.0, class_probs=True)
    verified = np.flatnonzero(scores >= bar)
    keep = verified[point_nms(moved[verified], raw_foreground[verified], refiner.cfg.nms_radius)]
    np.testing.assert_allclose(points, moved[keep], atol=1e-5)
    assert foreground.tolist() == raw_foreground[keep].tolist()
    mixed = mix_class_probabilities(torch.from_numpy(raw_probs), refiner_probs, 0.5)[keep].numpy()
    np.testing.assert_allclose(probs, mixed, atol=1e-6)
    assert classes.tolist() == mixed.argmax(-1).tolist()
    np.testing.assert_allclose(confidence, foreground * mixed.max(-1), atol=1e-6)


def test_class_mixing_is_geometric_and_leaves_the_learner_alone_at_zero():
    learner = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    refiner = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    assert torch.equal(mix_class_probabilities(learner, refiner, 0.0), learner)
    torch.testing.assert_close(mix_class_probabilities(learner, refiner, 1.0), refiner)
    half = mix_class_probabilities(learner, refiner, 0.5)
    expected = (learner * refiner).sqrt()
    torch.testing.assert_close(half, expected / expected.sum(-1, keepdim=True))
    assert half[0].argmax() == 1  # 0.7 x 0.1 < 0.2 x 0.8
    # A refiner without the class head ([P, 1] ones) leaves the learner's classes.
    assert torch.equal(mix_class_probabilities(learner, torch.ones(2, 1), 0.5), learner)


def test_a_bundle_with_a_score_head_exports_the_scores_and_its_bar(scored_model, tmp_path):
    manifest = export_bundle(scored_model, str(tmp_path / "b"), name="t", include_full=False)
    assert manifest["prompter"]["min_point_score"] == scored_model.point_refiner.cfg.min_score > 0
    assert manifest["provenance"]["config"]["point_refiner"]["score_head"] is True
    assert check_bundle(str(tmp_path / "b"), verbose=False) == []
    fixture = json.loads((tmp_path / "b" / "parity" / "point_refiner.json").read_text())
    assert fixture["outputs"]["point_scores"]["dtype"] == "float32"
    assert fixture["outputs"]["point_class_probs"]["dims"][1] == scored_model.config.num_classes
    assert manifest["prompter"]["refiner_class_weight"] == 0.5


def test_prompter_batch_labels_points_on_and_off_nuclei():
    from cfrsam.train.refiner import background_batch

    instances = torch.zeros(1, 64, 64, dtype=torch.long)
    instances[0, 10:20, 10:20] = 1  # centroid (15, 15)
    batch = {"image": torch.zeros(1, 3, 64, 64), "instances": instances, "centroids": [torch.tensor([[15.0, 15.0]])]}
    points, index = background_batch(batch, per_image=6, clearance=8.0, rng=np.random.default_rng(0))
    assert len(points) == 6 and index.tolist() == [0] * 6
    cells = points.long()
    assert (instances[0, cells[:, 1], cells[:, 0]] == 0).all()
    assert ((points - torch.tensor([15.0, 15.0])).norm(dim=-1) >= 8.0).all()


def _exportable(model, tmp_path):
    """The model saved as a checkpoint with a recorded validation, and the export arguments for it."""
    from cfrsam.checkpoint import CHECKPOINT_FORMAT

    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "model": model.state_dict(),
        "training": None,
        "metrics": {"validation": {"bpq": 0.5}},
    }
    torch.save(checkpoint, tmp_path / "c.pt")
    return checkpoint, ["--checkpoint", str(tmp_path / "c.pt"), "--no-full", "--no-parity"]


def test_export_overrides_the_refiners_serving_settings(scored_model, tmp_path):
    from cfrsam.export.cli import main as export_main

    checkpoint, argv = _exportable(scored_model, tmp_path)
    assert export_main(argv + ["--out", str(tmp_path / "b"), "--min-point-score", "0.2"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["prompter"]["min_point_score"] == 0.2
    assert manifest["prompter"]["refiner_class_weight"] == scored_model.point_refiner.cfg.class_weight
    # The recorded validation was measured at the old bar: kept aside with it, not claimed.
    assert "validation" not in manifest["metrics"]
    assert manifest["metrics"]["validation_before_settings"]["bpq"] == 0.5
    # So is a new mask threshold: served, the old one recorded beside the validation.
    assert export_main(argv + ["--out", str(tmp_path / "m"), "--mask-threshold", "-0.75"]) == 0
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["mask_threshold"] == -0.75
    assert "validation" not in manifest["metrics"]
    before = manifest["metrics"]["validation_before_settings"]
    assert before["settings"] == {"mask_threshold": scored_model.config.mask_threshold} and before["bpq"] == 0.5
    assert export_main(argv + ["--out", str(tmp_path / "n"), "--mask-threshold", "nan"]) == 2
    # And the prompter's threshold and NMS radius (the eighth session edited them into a checkpoint
    # by hand, and its bundle kept claiming the validation of the old threshold).
    tuned = dict(checkpoint, prompter={"min_foreground": 0.3, "nms_radius": 12.0})
    torch.save(tuned, tmp_path / "t.pt")
    tuned_argv = ["--checkpoint", str(tmp_path / "t.pt"), "--no-full", "--no-parity"]
    assert export_main(tuned_argv + ["--out", str(tmp_path / "f"), "--min-foreground", "0.25"]) == 0
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["prompter"]["min_foreground"] == 0.25 and manifest["prompter"]["nms_radius"] == 12.0
    assert "validation" not in manifest["metrics"]
    assert manifest["metrics"]["validation_before_settings"]["settings"] == {"min_foreground": 0.3}
    assert export_main(tuned_argv + ["--out", str(tmp_path / "g"), "--min-foreground", "1.2"]) == 2
    assert export_main(tuned_argv + ["--out", str(tmp_path / "h"), "--nms-radius", "0"]) == 2
    # A value out of range, or a setting the refiner has no head for, is refused with a message.
    assert export_main(argv + ["--out", str(tmp_path / "c"), "--refiner-class-weight", "1.5"]) == 2
    plain = dict(checkpoint, config=dict(checkpoint["config"], point_refiner=None))
    torch.save(plain, tmp_path / "p.pt")
    assert (
        export_main(["--checkpoint", str(tmp_path / "p.pt"), "--out", str(tmp_path / "d"), "--min-point-score", "0.2"])
        == 2
    )


def _texture(size: int, blur: float) -> np.ndarray:
    """An H&E-like RGB texture [size, size, 3] (0-255), Gaussian-blurred by `blur` px."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    grey = ndimage.gaussian_filter(rng.uniform(0, 255, (size, size)), 1.0)
    if blur:
        grey = ndimage.gaussian_filter(grey, blur)
    return np.stack([grey, grey * 0.6 + 40, grey * 0.8 + 30], axis=-1)


def test_blur_gate_lowers_the_bar_on_blurred_tiles_only(scored_model, tmp_path):
    from cfrsam.export.cli import main as export_main
    from cfrsam.inference import score_bar
    from cfrsam.prompt_learner.sharpness import tile_sharpness

    sharp, blurred = _texture(64, 0), _texture(64, 2.5)
    assert tile_sharpness(blurred) < 1.5 < tile_sharpness(sharp)
    mean, std = np.array(scored_model.config.pixel_mean), np.array(scored_model.config.pixel_std)
    tiles = [torch.from_numpy(((t - mean) / std).transpose(2, 0, 1)[None]).float() for t in (sharp, blurred)]
    refiner = scored_model.point_refiner
    plain = refiner.cfg
    try:
        refiner.cfg = dataclasses.replace(plain, blur_gate=1.5, blurred_min_score=0.2)
        assert [score_bar(scored_model, t) for t in tiles] == [plain.min_score, 0.2]
        gated = [len(detect_points(scored_model, t, 0.05, 4.0)[0]) for t in tiles]
        refiner.cfg = plain
        assert [score_bar(scored_model, t) for t in tiles] == [plain.min_score, plain.min_score]
        ungated = [len(detect_points(scored_model, t, 0.05, 4.0)[0]) for t in tiles]
    finally:
        refiner.cfg = plain
    assert gated[0] == ungated[0] and gated[1] >= ungated[1]

    _, argv = _exportable(scored_model, tmp_path)
    assert export_main(argv + ["--out", str(tmp_path / "g"), "--blur-gate", "1.1,0.2"]) == 0
    assert export_main(argv + ["--out", str(tmp_path / "u")]) == 0
    gated_manifest, plain_manifest = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "gu")
    assert gated_manifest["prompter"]["blur_gate"] == {"sharpness_below": 1.1, "min_point_score": 0.2}
    assert gated_manifest["prompter"]["min_point_score"] == plain_manifest["prompter"]["min_point_score"] > 0.2
    assert "blur_gate" not in plain_manifest["prompter"]
    assert gated_manifest["version"] != plain_manifest["version"]
    assert gated_manifest["metrics"]["validation_before_settings"]["settings"]["blur_gate"] == 0.0
    for bad in ("1.1,1.5", "0,0.2", "nan,0.2"):
        assert export_main(argv + ["--out", str(tmp_path / "bad"), "--blur-gate", bad]) == 2
    for unparsed in ("1.1", "x,y"):
        with pytest.raises(SystemExit) as exit_:
            export_main(argv + ["--out", str(tmp_path / "bad"), "--blur-gate", unparsed])
        assert exit_.value.code == 2


def test_heads_with_context_read_beyond_the_crop_and_the_bundle_exports(tmp_path):
    base = build_cfr_sam("tiny", input_size=64, window=32, seed=3)
    cfg = PointRefinerConfig(
        crop=16, width=8, stem_width=4, dilations=(1,), score_head=True, min_score=0.5,
        num_classes=base.config.num_classes, class_weight=0.5, context_crop=32, context_width=8, head_branch=8,
    )  # fmt: skip
    refiner = PointRefiner(cfg)
    torch.manual_seed(4)
    for p in refiner.parameters():
        torch.nn.init.normal_(p, std=0.3)
    refiner.eval()
    image = torch.randn(1, 3, 64, 64)
    point = torch.tensor([[32.0, 32.0]])
    changed = image.clone()
    changed[..., 17:21, 17:21] += 4.0  # inside the 32 px context window [16, 48), outside the 16 px crop [24, 40)
    with torch.no_grad():
        refined, score, probs = refiner.refine_and_score(image, point)
        refined_changed, score_changed, probs_changed = refiner.refine_and_score(changed, point)
    assert torch.equal(refined, refined_changed)  # the heat map reads the crop only
    assert not torch.allclose(score, score_changed) and not torch.allclose(probs, probs_changed)
    checkpoint = {"config": base.config.to_dict(), "model": base.state_dict(), "training": None, "metrics": None}
    model = build_cfr_sam(None, checkpoint=attach(checkpoint, refiner, {"note": "test"}, {"steps": 0}))
    assert model.point_refiner.cfg.context_crop == 32
    manifest = export_bundle(model, str(tmp_path / "b"), name="t", include_full=False)
    assert manifest["provenance"]["config"]["point_refiner"]["head_branch"] == 8
    assert check_bundle(str(tmp_path / "b"), verbose=False) == []
