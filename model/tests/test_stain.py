"""Stain statistics and their transfer (the RandStainNA augmentation), on synthetic images."""

import argparse

import numpy as np
import pytest

from cfrsam.data import AugmentConfig, random_color
from cfrsam.data.stain import lab_stats, lab_to_rgb, random_transfer, rgb_to_lab, tissue_mask, transfer


def he_like(seed: int, haematoxylin=(90, 60, 150), eosin=(230, 150, 200)) -> np.ndarray:
    """A 64 x 64 image: glass on the left, pink stroma with purple blobs on the right."""
    rng = np.random.default_rng(seed)
    image = np.full((64, 64, 3), 250.0)
    image[:, 16:] = eosin
    yy, xx = np.mgrid[:64, :64]
    for _ in range(6):
        cy, cx = rng.integers(8, 56), rng.integers(24, 56)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = haematoxylin
    return np.clip(image + rng.normal(0, 2, image.shape), 0, 255)


def test_lab_round_trip_and_known_values():
    rgb = np.random.default_rng(0).uniform(0, 255, (32, 32, 3))
    assert np.abs(lab_to_rgb(rgb_to_lab(rgb)) - rgb).max() < 1e-6
    white, black = rgb_to_lab(np.array([255.0, 255.0, 255.0])), rgb_to_lab(np.zeros(3))
    assert white[0] == pytest.approx(100, abs=0.01) and np.abs(white[1:]).max() < 0.02
    assert np.abs(black).max() < 1e-6


def test_stats_leave_glass_out():
    image = he_like(0)
    assert not tissue_mask(image)[:, :12].any() and tissue_mask(image)[:, 20:].all()
    mean, _ = lab_stats(image)
    tissue_only, _ = lab_stats(image[:, 16:])
    assert np.allclose(mean, tissue_only, atol=0.5)


def shifted(stats, by=(-5.0, 4.0, 3.0), spread=(1.2, 1.1, 0.9)):
    return tuple(np.add(stats[0], by)), tuple(np.multiply(stats[1], spread))


def test_transfer_takes_the_target_statistics_and_keeps_glass():
    source = he_like(0)
    target = shifted(lab_stats(source))
    moved = transfer(source, target)
    assert moved.dtype == np.float32 and moved.shape == source.shape
    mean, std = lab_stats(moved)
    assert np.allclose(mean, target[0], atol=0.5) and np.allclose(std, target[1], rtol=0.05)
    # A channel's spread moves at most MAX_SPREAD_RATIO times.
    _, wide = lab_stats(transfer(source, shifted(lab_stats(source), spread=(1.0, 10.0, 1.0))))
    assert wide[1] == pytest.approx(2 * lab_stats(source)[1][1], rel=0.05)
    assert np.abs(moved[:, :8] - source[:, :8]).max() < 1.0  # glass stays glass
    # The nuclei stay the darkest pixels: the transfer moves colours, not structure.
    nuclei = source.mean(-1) < 120
    assert moved.mean(-1)[nuclei].max() < moved.mean(-1)[~nuclei & tissue_mask(source)].min()


def test_random_transfer_draws_sets_alike():
    image = he_like(2)
    pink, purple = shifted(lab_stats(image), by=(0, 5, 0)), shifted(lab_stats(image), by=(0, -5, -5))
    bank = ((pink,) * 50, (purple,))  # a set of many images and a set of one
    rng = np.random.default_rng(0)
    hits = sum(np.allclose(lab_stats(random_transfer(image, rng, bank))[0], purple[0], atol=1.0) for _ in range(40))
    assert 10 <= hits <= 30


def test_augment_applies_the_transfer_only_when_asked():
    image = he_like(0).astype(np.float32)
    far = shifted(lab_stats(image), by=(-8, 6, -4))
    quiet = dict(color_prob=0.0, stain_prob=0.0, noise_prob=0.0)
    off = random_color(image, np.random.default_rng(0), AugmentConfig(stain_bank=((far,),), **quiet))
    assert np.array_equal(off, image)
    on = random_color(
        image, np.random.default_rng(0), AugmentConfig(stain_transfer_prob=1.0, stain_bank=((far,),), **quiet)
    )
    assert np.allclose(lab_stats(on)[0], far[0], atol=0.5)


def test_stain_transfer_flag_builds_a_bank_per_set(tmp_path):
    from PIL import Image

    from cfrsam.train import common

    for set_name, names in (("consep-train", ["train_1_000", "train_2_000", "train_3_000"]), ("big", ["a", "b"])):
        (tmp_path / set_name).mkdir()
        for k, name in enumerate(names):
            Image.fromarray(he_like(k).astype(np.uint8)).save(tmp_path / set_name / f"{name}.png")
            labels = np.zeros((64, 64), np.uint16)
            labels[30:36, 30:36] = 1
            Image.fromarray(labels).save(tmp_path / set_name / f"{name}.labels.png")
            (tmp_path / set_name / f"{name}.json").write_text('{"classNames": ["a"], "instances": 1}')
    args = argparse.Namespace(
        data=str(tmp_path), sets="consep-train,big", val_sources="3", val_limit=0, repeat="big=3", stain_transfer=0.5
    )
    train, val = common.build_datasets(args, ["a"], 32)
    consep, big = train.datasets
    assert consep.augment.stain_transfer_prob == big.augment.stain_transfer_prob == 0.5 and val.augment is None
    assert [len(group) for group in consep.augment.stain_bank] == [2, 2]  # distinct training images per set
    assert consep[0]["image"].shape == (3, 32, 32)
    with pytest.raises(SystemExit):
        common.build_datasets(argparse.Namespace(**{**vars(args), "stain_transfer": 1.5}), ["a"], 32)
    plain, _ = common.build_datasets(argparse.Namespace(**{**vars(args), "stain_transfer": 0.0}), ["a"], 32)
    assert all(d.augment.stain_transfer_prob == 0.0 and d.augment.stain_bank == () for d in plain.datasets)
