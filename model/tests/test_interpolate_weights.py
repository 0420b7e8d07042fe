"""diagnostics/interpolate_weights.py: which part it mixes, by how much, and the config check."""

import sys
from pathlib import Path

import pytest
import torch

from cfrsam.checkpoint import CHECKPOINT_FORMAT
from cfrsam.configs import make_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "diagnostics"))

import interpolate_weights  # noqa: E402


def checkpoint(path, value, refiner_config=None, **config):
    cfg = make_config("tiny", input_size=64, window=32, **config).to_dict()
    if refiner_config is not None:
        cfg["point_refiner"] = refiner_config
    model = {
        "image_encoder.w": torch.full((2,), value),
        "prompt_learner.w": torch.full((2,), value),
        "point_refiner.w": torch.full((2,), value),
        "mask_decoder.steps": torch.tensor([7]),  # not floating point: kept from A
    }
    torch.save({"format": CHECKPOINT_FORMAT, "config": cfg, "model": model}, path)
    return str(path)


REFINER = {"crop": 48, "width": 32, "stem_width": 16, "dilations": [1, 2, 4], "score_head": True, "num_classes": 4}


@pytest.mark.parametrize(
    "part, expected",
    [
        ("sam", {"image_encoder.w": 2.5, "prompt_learner.w": 4.0, "point_refiner.w": 4.0}),
        ("refiner", {"image_encoder.w": 4.0, "prompt_learner.w": 4.0, "point_refiner.w": 2.5}),
    ],
)
def test_mixes_only_the_named_part(tmp_path, part, expected):
    # The refiner configs differ only in spelling (a list against a tuple, a default left out).
    a = checkpoint(tmp_path / "a.pt", 4.0, REFINER)
    b = checkpoint(tmp_path / "b.pt", 1.0, dict(REFINER, dilations=(1, 2, 4), context_crop=0))
    out = tmp_path / "mixed.pt"
    assert interpolate_weights.main([a, b, "0.5", str(out), "--part", part]) == 0
    mixed = torch.load(out)["model"]
    for key, value in expected.items():
        assert torch.allclose(mixed[key], torch.full((2,), value)), key
    assert mixed["mask_decoder.steps"].tolist() == [7]


def test_refuses_models_of_different_configs(tmp_path):
    a = checkpoint(tmp_path / "a.pt", 4.0, REFINER)
    b = checkpoint(tmp_path / "b.pt", 1.0, dict(REFINER, width=16))
    with pytest.raises(SystemExit, match="different configs"):
        interpolate_weights.main([a, b, "0.5", str(tmp_path / "mixed.pt"), "--part", "refiner"])
