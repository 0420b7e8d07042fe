"""Dataset loader on small synthetic fixtures (and, when present, the shared data)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfrsam.data import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    UNKNOWN_CLASS,
    AugmentConfig,
    NucleiDataset,
    collate_nuclei,
    default_data_root,
    flip_rotate,
    gaussian_blur,
    instance_centroids,
    list_samples,
    random_blur,
    random_color,
    read_labels,
    source_of,
    split_by_source,
)

torch.set_num_threads(1)


def write_sample(root: Path, name: str, labels: np.ndarray, meta: dict, image=None) -> None:
    h, w = labels.shape
    if image is None:
        rng = np.random.default_rng(abs(hash(name)) % 2**32)
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / f"{name}.png")
    Image.fromarray(labels.astype(np.uint16)).save(root / f"{name}.labels.png")
    meta = dict(meta, instances=int(labels.max()))
    (root / f"{name}.json").write_text(json.dumps(meta))


def blocks(h, w, boxes):
    """Instance map with nucleus i + 1 filling boxes[i] = (row0, col0, rows, cols)."""
    labels = np.zeros((h, w), dtype=np.int32)
    for i, (r, c, nr, nc) in enumerate(boxes):
        labels[r : r + nr, c : c + nc] = i + 1
    return labels


def box_centroid(r, c, nr, nc):
    return (c + nc / 2.0, r + nr / 2.0)


BOXES = [(10, 20, 4, 4), (40, 5, 3, 5), (2, 50, 6, 2), (50, 52, 5, 5)]


@pytest.fixture()
def fixture_dir(tmp_path):
    labels = blocks(64, 64, BOXES)
    write_sample(
        tmp_path,
        "train_1_000",
        labels,
        {"source": "synthetic", "classNames": ["a", "b", "c"], "classes": {"1": 2, "2": 0, "3": 1}},
    )  # nucleus 4 has no class
    write_sample(
        tmp_path,
        "train_1_001",
        labels,
        {"source": "synthetic", "classNames": ["a", "b", "c"], "classes": {"1": 1, "2": 1, "3": 1, "4": 1}},
    )
    write_sample(tmp_path, "train_2_000", labels, {"source": "synthetic", "classNames": ["nucleus"], "mpp": 0.25})
    return tmp_path


def test_label_png_16_bit_roundtrip(tmp_path):
    labels = np.array([[0, 1, 255, 256], [1000, 40000, 65535, 7]], dtype=np.uint16)
    Image.fromarray(labels).save(tmp_path / "x.labels.png")
    with Image.open(tmp_path / "x.labels.png") as im:
        assert im.mode in ("I;16", "I")
    read = read_labels(tmp_path / "x.labels.png")
    assert read.dtype == np.int32
    assert np.array_equal(read, labels.astype(np.int32))
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="grey"):
        read_labels(tmp_path / "rgb.png")


def test_centroids_use_pixel_centres():
    labels = blocks(64, 64, BOXES)
    centroids, counts = instance_centroids(labels)
    for i, box in enumerate(BOXES):
        assert tuple(centroids[i + 1]) == pytest.approx(box_centroid(*box))
        assert counts[i + 1] == box[2] * box[3]
    single = np.zeros((3, 3), dtype=np.int32)
    single[1, 2] = 1  # pixel (row 1, col 2) -> centre (2.5, 1.5)
    assert tuple(instance_centroids(single)[0][1]) == (2.5, 1.5)


def test_whole_image_sample(fixture_dir):
    ds = NucleiDataset(fixture_dir, names=["train_1_000"], size=64, crop="center")
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["centroids"].tolist() == [list(box_centroid(*b)) for b in BOXES]
    assert item["classes"].tolist() == [2, 0, 1, UNKNOWN_CLASS]
    assert item["instances"].dtype == torch.int64
    assert torch.equal(item["instances"], torch.from_numpy(blocks(64, 64, BOXES)).long())
    assert torch.equal(item["foreground"], (item["instances"] > 0).float())
    rgb = np.asarray(Image.open(fixture_dir / "train_1_000.png"), dtype=np.float32)
    expected = (rgb - np.array(SAM_PIXEL_MEAN)) / np.array(SAM_PIXEL_STD)
    assert np.allclose(item["image"].numpy().transpose(1, 2, 0), expected, atol=1e-5)
    assert item["mpp"] is None and item["name"] == "train_1_000"


def test_class_map_and_single_class_sets(fixture_dir):
    ds = NucleiDataset(fixture_dir, size=64, class_map={"b": 0, "c": 1, "nucleus": 0})
    by_name = {ds.names[i]: ds[i] for i in range(len(ds))}
    assert by_name["train_1_000"]["classes"].tolist() == [1, UNKNOWN_CLASS, 0, UNKNOWN_CLASS]
    assert by_name["train_1_001"]["classes"].tolist() == [0, 0, 0, 0]
    assert by_name["train_2_000"]["classes"].tolist() == [0, 0, 0, 0]
    assert by_name["train_2_000"]["mpp"] == 0.25
    unmapped = NucleiDataset(fixture_dir, names=["train_2_000"], size=64, class_map={"a": 0})
    assert unmapped[0]["classes"].tolist() == [UNKNOWN_CLASS] * 4


def test_crop_drops_nuclei_whose_centroid_is_outside(tmp_path):
    # The centre crop of 32 from 64 is [16, 48)^2.
    boxes = [
        (20, 20, 4, 4),  # inside, centroid (22, 22)
        (44, 30, 6, 4),  # cut by the crop's bottom edge, centroid (32, 47) inside
        (46, 10, 6, 8),  # cut, centroid (14, 49) outside, but 4 of its pixels are in the crop
        (2, 2, 3, 3),  # far outside
    ]
    write_sample(tmp_path, "tile", blocks(64, 64, boxes), {"classNames": ["nucleus"]})
    item = NucleiDataset(tmp_path, size=32, crop="center")[0]
    assert item["origin"] == (16, 16)
    assert item["instance_ids"].tolist() == [1, 2]
    assert item["centroids"].tolist() == [[6.0, 6.0], [16.0, 31.0]]
    instances, foreground = item["instances"], item["foreground"]
    assert instances.max().item() == 2
    assert (instances == 2).sum().item() == 4 * 4  # the visible part of nucleus 2
    dropped = (foreground > 0) & (instances == 0)
    assert dropped.sum().item() == 2 * 2 and dropped[30:32, 0:2].all()


def test_random_crop_keeps_instances_and_centroids_consistent(tmp_path):
    rng = np.random.default_rng(0)
    boxes = [(int(r), int(c), 3, 3) for r, c in rng.integers(0, 97, size=(40, 2))]
    labels = blocks(100, 100, boxes)
    # Later boxes overwrite earlier ones; keep the instance map contiguous.
    ids = np.unique(labels[labels > 0])
    lookup = np.zeros(labels.max() + 1, dtype=np.int32)
    lookup[ids] = np.arange(1, len(ids) + 1)
    labels = lookup[labels]
    write_sample(tmp_path, "big", labels, {"classNames": ["nucleus"]})
    full_centroids, _ = instance_centroids(labels)
    ds = NucleiDataset(tmp_path, size=32, crop="random")
    torch.manual_seed(0)
    for _ in range(5):
        item = ds[0]
        x0, y0 = item["origin"]
        cents = item["centroids"].numpy()
        assert ((cents >= 0) & (cents < 32)).all()
        expected = full_centroids[item["instance_ids"].numpy()] - [x0, y0]
        assert np.allclose(cents, expected, atol=1e-5)
        # Every nucleus whose centroid falls inside the crop is listed.
        inside = (full_centroids[1:] - [x0, y0] >= 0).all(1) & (full_centroids[1:] - [x0, y0] < 32).all(1)
        assert set(item["instance_ids"].tolist()) == set((np.nonzero(inside)[0] + 1).tolist())
        crop = labels[y0 : y0 + 32, x0 : x0 + 32]
        assert torch.equal(item["foreground"], torch.from_numpy((crop > 0).astype(np.float32)))


def test_small_images_are_padded(tmp_path):
    write_sample(tmp_path, "small", blocks(20, 24, [(2, 3, 4, 4)]), {"classNames": ["nucleus"]})
    item = NucleiDataset(tmp_path, size=32)[0]
    assert item["image"].shape == (3, 32, 32)
    assert item["centroids"].tolist() == [[5.0, 4.0]]
    white = (255 - np.array(SAM_PIXEL_MEAN)) / np.array(SAM_PIXEL_STD)
    assert np.allclose(item["image"][:, 31, 31].numpy(), white, atol=1e-5)


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_flip_rotate_moves_centroids_exactly(k, flip):
    labels = blocks(48, 40, BOXES[:3])
    image = np.random.default_rng(0).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
    cents = instance_centroids(labels)[0][1:].astype(np.float32)
    image2, labels2, cents2 = flip_rotate(image, labels, cents, k, flip)
    assert image2.shape[:2] == labels2.shape
    assert np.allclose(instance_centroids(labels2)[0][1:], cents2, atol=1e-5)


def test_augmented_items(fixture_dir):
    cfg = AugmentConfig(scale_range=(0.8, 1.25), color_prob=1.0, stain_prob=1.0, noise_prob=1.0)
    ds = NucleiDataset(fixture_dir, names=["train_1_000"], size=32, augment=cfg)
    torch.manual_seed(1)
    for _ in range(6):
        item = ds[0]
        assert item["image"].shape == (3, 32, 32)
        assert torch.isfinite(item["image"]).all()
        cents = item["centroids"]
        assert ((cents >= 0) & (cents < 32)).all()
        assert len(cents) == len(item["classes"]) == len(item["instance_ids"])
        assert item["instances"].max().item() <= len(cents)
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.float32)
    out = random_color(rgb, rng, cfg)
    assert out.shape == rgb.shape and out.min() >= 0 and out.max() <= 255


def test_collate_variable_nuclei(fixture_dir):
    ds = NucleiDataset(fixture_dir, size=32, crop="center")
    batch = collate_nuclei([ds[0], ds[2]])
    assert batch["image"].shape == (2, 3, 32, 32)
    assert batch["instances"].shape == (2, 32, 32)
    assert batch["foreground"].shape == (2, 32, 32)
    assert isinstance(batch["centroids"], list) and len(batch["centroids"]) == 2
    assert batch["name"] == [ds.names[0], ds.names[2]]


def test_split_by_source():
    names = ["train_1_000", "train_1_001", "train_10_000", "train_2_005", "image01"]
    assert [source_of(n) for n in names] == ["1", "1", "10", "2", "image01"]
    train, val = split_by_source(names, [1, "image01"])
    assert val == ["train_1_000", "train_1_001", "image01"]
    assert train == ["train_10_000", "train_2_005"]
    assert not set(train) & set(val)


def test_dataset_split_argument(fixture_dir):
    assert NucleiDataset(fixture_dir, split="val", val_sources=[2]).names == ["train_2_000"]
    assert NucleiDataset(fixture_dir, split="train", val_sources=[2]).names == [
        "train_1_000",
        "train_1_001",
    ]
    with pytest.raises(ValueError):
        NucleiDataset(fixture_dir, split="val")
    assert list_samples(fixture_dir) == ["train_1_000", "train_1_001", "train_2_000"]


REAL = default_data_root()


@pytest.mark.skipif(
    not (REAL / "consep-train").is_dir(),
    reason=f"shared data not found at {REAL} (set CFRSAM_DATA to the data directory)",
)
def test_real_data_reads_exactly():
    names = list_samples(REAL / "consep-train")
    assert len({source_of(n) for n in names}) > 1
    for subset in ("consep-train", "monuseg-train"):
        ds = NucleiDataset(REAL / subset, names=list_samples(REAL / subset)[:1], size=256, crop="center")
        meta = json.loads((REAL / subset / f"{ds.names[0]}.json").read_text())
        labels = read_labels(REAL / subset / f"{ds.names[0]}.labels.png")
        assert labels.max() == meta["instances"]
        assert len(np.unique(labels)) == meta["instances"] + 1
        item = ds[0]
        assert item["image"].shape == (3, 256, 256)
        assert len(item["centroids"]) > 0
        assert (item["classes"] >= 0).all()


def test_target_mpp_resamples_samples_that_give_their_scale(tmp_path):
    # One 8x8 nucleus in the centre of a 64 px image at 0.5 um/px; resampled to 0.25 um/px it is 16x16.
    labels = blocks(64, 64, [(28, 28, 8, 8)])
    write_sample(tmp_path, "half", labels, {"classNames": ["nucleus"], "mpp": 0.5})
    write_sample(tmp_path, "unknown", labels, {"classNames": ["nucleus"]})
    ds = NucleiDataset(tmp_path, size=32, crop="center", target_mpp=0.25)
    half, unknown = ds[0], ds[1]
    assert half["name"] == "half" and half["scale"] == pytest.approx(2.0)
    assert (half["instances"] == 1).sum().item() == 16 * 16
    assert half["centroids"].tolist() == [[16.0, 16.0]]
    assert unknown["scale"] == 1.0 and (unknown["instances"] == 1).sum().item() == 8 * 8
    assert NucleiDataset(tmp_path, size=32, crop="center")[0]["scale"] == 1.0
    with pytest.raises(ValueError):
        NucleiDataset(tmp_path, size=32, target_mpp=0)


def test_estimated_mpp_resamples_samples_without_their_scale(tmp_path):
    # CPM-15's 20x images give no mpp: the committed estimate (from their nuclei's size) stands in.
    set_dir = tmp_path / "mixed"
    set_dir.mkdir()
    write_sample(set_dir, "small", blocks(64, 64, [(28, 28, 8, 8)]), {"classNames": ["nucleus"]})
    write_sample(set_dir, "large", blocks(64, 64, [(24, 24, 16, 16)]), {"classNames": ["nucleus"]})
    estimates = {"mixed/small": 0.5}
    ds = NucleiDataset(set_dir, size=32, crop="center", target_mpp=0.25, mpp_estimates=estimates)
    small, large = (ds[ds.names.index(n)] for n in ("small", "large"))
    assert small["scale"] == pytest.approx(2.0) and (small["instances"] == 1).sum().item() == 16 * 16
    assert large["scale"] == 1.0 and (large["instances"] == 1).sum().item() == 16 * 16
    # Without target_mpp nothing is resampled, estimate or not.
    assert NucleiDataset(set_dir, size=32, crop="center", mpp_estimates=estimates)[0]["scale"] == 1.0


def test_scale_estimate_from_nucleus_size():
    from cfrsam.data.dataset import lookup_mpp
    from cfrsam.data.scale import estimate_mpp, median_diameter, snap_mpp

    labels = blocks(64, 64, [(0, 0, 10, 10), (20, 20, 10, 10), (40, 40, 20, 20)])
    assert median_diameter(labels) == pytest.approx(2 * np.sqrt(100 / np.pi))
    assert np.isnan(median_diameter(np.zeros((8, 8), dtype=np.int32)))
    # 0.25 and 0.5 um/px meet at their geometric mean, 0.354.
    assert snap_mpp(0.34) == 0.25 and snap_mpp(0.36) == 0.5 and snap_mpp(0.9) == 0.5
    # Nuclei half the reference's diameter in pixels: an image at half the magnification.
    assert estimate_mpp(12.0, reference_diameter=25.0, reference_mpp=0.25) == 0.5
    assert estimate_mpp(22.0, reference_diameter=25.0, reference_mpp=0.25) == 0.25
    assert lookup_mpp({"mpp": 0.25}, "/x/cpm15", "a", {"cpm15/a": 0.5}) == 0.25
    assert lookup_mpp({}, "/x/cpm15", "a", {"cpm15/a": 0.5}) == 0.5
    assert lookup_mpp({}, "/x/cpm15", "b", {"cpm15/a": 0.5}) is None


def test_committed_mpp_estimates_match_the_shared_data():
    """The committed table is what `python -m cfrsam.data.scale` computes from the shared data."""
    from cfrsam.data.scale import ESTIMATES_PATH, estimate_mpp

    root = default_data_root() / "cpm15"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}: the committed CPM-15 scale estimates are not checked")
    table = json.loads(ESTIMATES_PATH.read_text())
    ref_px = table["reference"]["median_diameter_um"] / 0.25
    samples = table["samples"]
    assert len(samples) == len(list_samples(root))
    for key, entry in samples.items():
        labels = read_labels(root / f"{key.split('/', 1)[1]}.labels.png")
        counts = np.bincount(labels.ravel())[1:]
        d = float(np.median(2 * np.sqrt(counts[counts > 0] / np.pi)))
        assert d == pytest.approx(entry["median_diameter_px"], abs=0.01)
        assert estimate_mpp(d, ref_px, 0.25) == entry["mpp"]
    # CPM-15 mixes the two magnifications; both are present.
    assert {e["mpp"] for e in samples.values()} == {0.25, 0.5}


def test_training_sets_repeat_and_hold_out(tmp_path):
    """--repeat draws a set's images K times per epoch; --hold-out leaves its last N names out."""
    import argparse

    from cfrsam.train import common

    (tmp_path / "consep-train").mkdir()
    (tmp_path / "big").mkdir()
    for i in range(3):
        write_sample(
            tmp_path / "consep-train", f"train_{i + 1}_000", blocks(32, 32, [(2, 3, 4, 4)]), {"classNames": ["a"]}
        )
    for name in ("img1", "img2", "img3"):
        write_sample(tmp_path / "big", name, blocks(64, 64, [(2, 3, 4, 4)]), {"classNames": ["nucleus"]})
    args = argparse.Namespace(
        data=str(tmp_path), sets="consep-train,big", val_sources="3", val_limit=0, repeat="big=4", hold_out="big=1"
    )
    train, val = common.build_datasets(args, ["a"], 32)
    consep, big = train.datasets
    assert len(consep) == 2 and len(val) == 1
    assert big.names == ["img1", "img2"] * 4  # img3 held out, the rest drawn 4 times
    # The default zoom of the crops; --scale-range widens it for every training set, not validation.
    assert consep.augment.scale_range == big.augment.scale_range == (0.9, 1.1) and val.augment is None
    wide, _ = common.build_datasets(argparse.Namespace(**{**vars(args), "scale_range": "0.75,1.4"}), ["a"], 32)
    assert all(d.augment.scale_range == (0.75, 1.4) for d in wide.datasets)
    torch.manual_seed(0)  # the dataset draws its zoom from torch's generator
    zooms = [wide.datasets[1][i]["scale"] for i in range(len(wide.datasets[1]))]
    assert all(0.75 - 1e-6 <= z <= 1.4 + 0.05 for z in zooms) and max(zooms) > 1.1

    bad_args = (
        dict(repeat="big=0"),
        dict(hold_out="big=3"),
        dict(repeat="consep-train=2"),
        dict(repeat="other=2"),
        dict(scale_range="1.2,0.8"),
        dict(scale_range="0,1"),
        dict(scale_range="1"),
    )
    for bad in bad_args:
        with pytest.raises(SystemExit):
            common.build_datasets(argparse.Namespace(**{**vars(args), "repeat": "", "hold_out": "", **bad}), ["a"], 32)


def test_stages_and_refiner_take_the_same_sampling_flags():
    """The point refiner trains on crops drawn like the stages' (--target-mpp, --scale-range)."""
    import argparse

    from cfrsam.train import common, refiner

    flags = ["--target-mpp", "0.25", "--scale-range", "0.8,1.25"]
    ref = refiner.parse_args(["--checkpoint", "x", "--out", "y", *flags])
    stages = argparse.ArgumentParser()
    common.add_common_args(stages)  # what stage1 and stage2 parse
    stage = stages.parse_args(["--out", "y", *flags])
    assert (ref.target_mpp, ref.scale_range) == (stage.target_mpp, stage.scale_range) == (0.25, "0.8,1.25")
    assert refiner.parse_args(["--checkpoint", "x", "--out", "y"]).target_mpp == 0.0


def test_focus_blur_smooths_pixels_and_leaves_geometry():
    """--blur: a crop blurred as an out-of-focus scan is; labels and centroids stay as they are."""
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 255, size=(32, 32, 3)).astype(np.float32)
    blurred = gaussian_blur(rgb, 1.5)
    assert blurred.shape == rgb.shape
    # Smoothing: the mean kept, the pixel-to-pixel differences much smaller.
    assert abs(float(blurred.mean()) - float(rgb.mean())) < 1.0
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.3 * np.abs(np.diff(rgb, axis=1)).mean()
    # Off (the default) draws nothing from the generator, so earlier recipes replay exactly.
    off, on = AugmentConfig(), AugmentConfig(blur_prob=1.0, blur_sigma=(1.0, 1.0))
    state = np.random.default_rng(3)
    assert random_blur(rgb, state, off) is rgb and state.random() == np.random.default_rng(3).random()
    assert np.allclose(random_blur(rgb, np.random.default_rng(3), on), gaussian_blur(rgb, 1.0))


def test_blur_flags_reach_every_training_set(tmp_path):
    import argparse

    from cfrsam.train import common

    (tmp_path / "consep-train").mkdir()
    for i in range(2):
        write_sample(
            tmp_path / "consep-train", f"train_{i + 1}_000", blocks(32, 32, [(2, 3, 4, 4)]), {"classNames": ["a"]}
        )
    args = argparse.Namespace(data=str(tmp_path), sets="consep-train", val_sources="2", val_limit=0, blur=0.3)
    train, val = common.build_datasets(args, ["a"], 32)
    assert train.augment.blur_prob == 0.3 and train.augment.blur_sigma == (0.5, 2.0) and val.augment is None
    wide, _ = common.build_datasets(argparse.Namespace(**{**vars(args), "blur_sigma": "1,3"}), ["a"], 32)
    assert wide.augment.blur_sigma == (1.0, 3.0)
    for bad in (dict(blur=1.5), dict(blur_sigma="2,1"), dict(blur_sigma="x")):
        with pytest.raises(SystemExit):
            common.build_datasets(argparse.Namespace(**{**vars(args), **bad}), ["a"], 32)
