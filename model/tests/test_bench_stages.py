"""The GPU path's stage benchmark (cfrsam.bench_stages), run on the CPU with the committed bundle."""

import json
import os

import numpy as np

from cfrsam.bench_stages import batched_inputs, main, tile_ceiling

BUNDLE = os.path.join(os.path.dirname(__file__), "..", "..", "models", "tiny")


def test_batched_inputs_repeat_tiles_and_cycle_prompts():
    inputs = {
        "encoder": {"image": np.zeros((1, 3, 8, 8), np.float32)},
        "decoder_prompts": {
            "image_embedding": np.zeros((1, 4, 2, 2), np.float32),
            "point_coords": np.arange(6, dtype=np.float32).reshape(3, 1, 2),
            "point_labels": np.ones((3, 1), np.float32),
        },
    }
    assert batched_inputs(inputs, "encoder", 4)["image"].shape == (4, 3, 8, 8)
    prompts = batched_inputs(inputs, "decoder_prompts", 5)
    assert prompts["point_coords"].shape == (5, 1, 2) and prompts["point_labels"].shape == (5, 1)
    assert prompts["image_embedding"].shape == (1, 4, 2, 2)  # one prepared tile for every prompt
    assert prompts["point_coords"][3, 0, 0] == 0.0  # cycled from the first prompt


def test_tile_ceiling_takes_each_stage_at_its_largest_batch():
    ms = {g: {1: 10.0, 4: 20.0} for g in ("prompter", "encoder", "decoder_image", "decoder_prompts")}
    c = tile_ceiling(ms, prompts_per_tile=8, tile_px=256 * 256)
    assert c["ms_per_tile"] == 3 * 5.0 + 8 * 5.0
    assert abs(c["tiles_per_s"] - 1000 / 55.0) < 1e-9


def test_cpu_run_writes_every_graph_and_batch(tmp_path):
    out = tmp_path / "stages.json"
    code = main(
        [
            "--bundle",
            BUNDLE,
            "--device",
            "cpu",
            "--batches",
            "1,2",
            "--precisions",
            "fp32",
            "--warmup",
            "0",
            "--reps",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    ms = record["ms"]["torch fp32"]
    assert set(ms) == {"prompter", "encoder", "decoder_image", "decoder_prompts"}
    assert all(set(by_batch) == {"1", "2"} and all(v > 0 for v in by_batch.values()) for by_batch in ms.values())
    assert record["tile_ceiling"]["torch fp32"]["tiles_per_s"] > 0
    assert (tmp_path / "stages.md").read_text().startswith("| runtime | graph |")
