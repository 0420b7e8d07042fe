"""Export round trip: a tiny bundle at 64 x 64, its manifest, ONNX validity and `--check`."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from cfrsam import build_cfr_sam
from cfrsam.checkpoint import save_checkpoint
from cfrsam.export import GRAPH_IO, check_bundle, main, state_dict_sha256
from cfrsam.export.onnx_files import check_graph
from cfrsam.export.weights import model_sha256

torch.set_num_threads(1)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMITTED = os.path.join(REPO_ROOT, "models", "tiny")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tiny64"
    rc = main(
        [
            "--config",
            "tiny",
            "--out",
            str(out),
            "--input-size",
            "64",
            "--window",
            "32",
            "--seed",
            "0",
            "--no-full",
            "--name",
            "test-tiny",
        ]
    )
    assert rc == 0
    return str(out)


def test_bundle_files_and_manifest(bundle):
    with open(os.path.join(bundle, "manifest.json")) as f:
        m = json.load(f)
    graphs = ["prompter", "encoder", "decoder_image", "decoder_prompts"]
    assert sorted(m["graphs"]) == sorted(graphs)
    for g in graphs:
        assert os.path.isfile(os.path.join(bundle, f"{g}.onnx"))
        assert os.path.isfile(os.path.join(bundle, "parity", f"{g}.json"))
    assert m["format"] == "cfrsam-bundle/1" and m["name"] == "test-tiny" and m["config"] == "tiny"
    assert m["input_size"] == 64 and m["patch_size"] == 16
    assert m["normalization"] == {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    assert [c["name"] for c in m["classes"]] == ["other", "inflammatory", "epithelial", "spindle-shaped"]
    assert all(c["color"].startswith("#") and len(c["color"]) == 7 for c in m["classes"])
    assert m["mpp"] == 0.25 and m["hmfm_levels"] == [1, 3, 5] and m["feature_shape"] == [3, 192, 4, 4]
    assert m["refinement"]["mode"] == "window" and m["refinement"]["window"] == 32
    assert m["prompter"]["anchors"] == 64 and m["mask_threshold"] == 0.0
    prov = m["provenance"]
    settings = {k: m["prompter"][k] for k in ("min_foreground", "nms_radius")}
    assert m["version"] == "0.1.0+" + model_sha256(prov["weights_sha256"], prov["config"], settings)[:12]
    assert prov["seed"] == 0 and prov["training"] is None and prov["config"]["name"] == "tiny"
    weights = torch.load(os.path.join(bundle, "weights.pt"))
    assert state_dict_sha256(weights) == prov["weights_sha256"]
    assert all(v.dtype != torch.float32 for v in weights.values())  # stored as fp16
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(bundle) for f in fs)
    assert total < 30e6


def test_graphs_are_valid_onnx_with_contract_names(bundle):
    import onnx

    for graph, (inputs, outputs) in GRAPH_IO.items():
        path = os.path.join(bundle, f"{graph}.onnx")
        if not os.path.exists(path):
            continue
        check_graph(path)
        model = onnx.load(path)
        assert [i.name for i in model.graph.input] == inputs
        assert [o.name for o in model.graph.output] == outputs
    dec = onnx.load(os.path.join(bundle, "decoder_prompts.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in dec.graph.input}
    assert dims["point_coords"] == ["P", "N", 2] and dims["point_labels"] == ["P", "N"]
    enc = onnx.load(os.path.join(bundle, "encoder.onnx"))
    assert enc.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "B"


def test_deform_conv_native_or_grid_sample(bundle, tmp_path):
    """BGMR's 8 -> 8 deformable layer is ONNX's DeformConv by default (decoder_prompts at opset 19,
    reductions converted); --deform-conv grid-sample keeps every graph at opset 17 without it."""
    import onnx

    def ops(path):
        model = onnx.load(path)
        opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        return opset, [n.op_type for n in model.graph.node]

    with open(os.path.join(bundle, "manifest.json")) as f:
        entries = json.load(f)["graphs"]
    opset, native = ops(os.path.join(bundle, "decoder_prompts.onnx"))
    assert opset == 19 and entries["decoder_prompts"]["opset"] == 19
    assert native.count("DeformConv") == 1 and native.count("GridSample") == 1  # the 16 -> 8 layer projects first
    assert ops(os.path.join(bundle, "encoder.onnx"))[0] == 17 and entries["encoder"]["opset"] == 17

    out = tmp_path / "grid"
    assert (
        main(["--checkpoint", bundle, "--out", str(out), "--no-full", "--no-parity", "--deform-conv", "grid-sample"])
        == 0
    )
    opset, plain = ops(str(out / "decoder_prompts.onnx"))
    assert opset == 17 and "DeformConv" not in plain and plain.count("GridSample") == 2
    check_graph(str(out / "decoder_prompts.onnx"))


def test_parity_fixture_layout(bundle):
    with open(os.path.join(bundle, "parity", "decoder_prompts.json")) as f:
        fx = json.load(f)
    assert set(fx["inputs"]) == set(GRAPH_IO["decoder_prompts"][0])
    assert fx["inputs"]["point_labels"]["dims"] == [3, 2]
    labels = np.fromfile(os.path.join(bundle, "parity", fx["inputs"]["point_labels"]["file"]), "<f4")
    assert sorted(set(labels.tolist())) == [-1.0, 0.0, 1.0, 2.0, 3.0]
    assert fx["outputs"]["window_origin"]["dtype"] == "int64"
    assert fx["outputs"]["mask_logits"]["dims"] == [3, 32, 32]
    assert {"atol", "rtol"} <= set(fx["tolerance"])


def test_check_passes_then_detects_tampering(bundle, tmp_path):
    assert check_bundle(bundle, verbose=False) == []
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "parity" / "decoder_prompts.json") as f:
        spec = json.load(f)["outputs"]["mask_logits"]
    path = copy / "parity" / spec["file"]
    values = np.fromfile(path, "<f4")
    values[0] += 1.0
    values.tofile(path)
    assert main(["--check", str(copy)]) == 1


def test_cli_errors_are_messages(tmp_path, capsys):
    assert main(["--config", "xl", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown config 'xl'" in err and "tiny" in err and "Traceback" not in err
    assert main(["--config", "tiny", "--out", str(tmp_path / "x"), "--input-size", "100"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["--config", "tiny", "--out", str(tmp_path / "x"), "--checkpoint", str(bad)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    lora = tmp_path / "lora.pt"
    save_checkpoint(str(lora), build_cfr_sam("tiny", input_size=64, window=32, peft_mode="lora"))
    assert (
        main(
            [
                "--config",
                "tiny",
                "--out",
                str(tmp_path / "x"),
                "--checkpoint",
                str(lora),
                "--input-size",
                "64",
                "--window",
                "32",
            ]
        )
        == 2
    )
    assert "does not fit the model" in capsys.readouterr().err
    assert main(["--check", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMMITTED, "manifest.json")), reason="no committed bundle")
def test_committed_tiny_bundle_matches_code():
    assert check_bundle(COMMITTED, verbose=False) == []


def test_random_init_bundle_checks_without_weights(bundle, tmp_path):
    copy = tmp_path / "noweights"
    shutil.copytree(bundle, copy)
    os.remove(copy / "weights.pt")
    assert check_bundle(str(copy), verbose=False) == []  # weights regenerated from config + seed


def test_encoder_with_a_conv_stem_exports_with_parity(tmp_path):
    model = build_cfr_sam("tiny", input_size=64, window=32, seed=4, image_encoder__conv_stem=(8, 16))
    with torch.no_grad():
        model.image_encoder.conv_stem.proj.weight.normal_(std=0.1)  # a stem that does something
    ckpt = tmp_path / "stem.pt"
    save_checkpoint(ckpt, model)
    out = tmp_path / "bundle"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--no-full", "--name", "t"]) == 0
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["provenance"]["config"]["image_encoder"]["conv_stem"] == [8, 16]
    assert check_bundle(str(out), verbose=False) == []


def test_bundle_exported_again_keeps_weights_and_provenance(tmp_path, capsys):
    # A finalized checkpoint (what `cfrsam.train.finalize` writes): tuned prompter, metrics, provenance.
    model = build_cfr_sam("tiny", input_size=64, window=32, seed=3)
    ckpt = tmp_path / "final.pt"
    torch.save(
        {
            "format": "cfrsam-checkpoint/1",
            "config": model.config.to_dict(),
            "model": model.state_dict(),
            "training": {"stage1": {"epoch": 7}, "stage2": {"epoch": 5}},
            "metrics": {"validation": {"bpq": 0.3}},
            "prompter": {"min_foreground": 0.35, "nms_radius": 12.0},
        },
        ckpt,
    )
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["--checkpoint", str(ckpt), "--out", str(first), "--no-full", "--name", "t"]) == 0
    assert main(["--checkpoint", str(first), "--out", str(again), "--no-full", "--name", "t"]) == 0
    a, b = (json.load(open(d / "manifest.json")) for d in (first, again))
    assert b["version"] == a["version"]
    assert b["provenance"]["weights_sha256"] == a["provenance"]["weights_sha256"]
    assert (
        b["prompter"]
        == a["prompter"]
        == {"anchors": a["prompter"]["anchors"], "min_foreground": 0.35, "nms_radius": 12.0}
    )
    assert b["metrics"] == a["metrics"] and b["provenance"]["training"] == a["provenance"]["training"]
    assert b["provenance"]["source"] == {"checkpoint": "final.pt", "sam_checkpoint": None, "bundle": a["version"]}
    assert check_bundle(str(again), verbose=False) == []
    # Another window is another version (the version hashes the config).
    assert main(["--checkpoint", str(first), "--out", str(tmp_path / "w16"), "--no-full", "--window", "16"]) == 0
    assert json.load(open(tmp_path / "w16" / "manifest.json"))["version"] != a["version"]
    # Another prompter threshold finds other nuclei: another version too.
    other = torch.load(ckpt, map_location="cpu")
    other["prompter"] = {"min_foreground": 0.4, "nms_radius": 12.0}
    torch.save(other, tmp_path / "other.pt")
    assert (
        main(["--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "t04"), "--no-full", "--name", "t"])
        == 0
    )
    assert json.load(open(tmp_path / "t04" / "manifest.json"))["version"] != a["version"]
    assert main(["--checkpoint", str(first), "--out", str(first)]) == 2
    assert "--out must differ" in capsys.readouterr().err
