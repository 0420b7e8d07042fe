"""Export a model as a bundle directory, load a bundle back into PyTorch, and check its parity."""

import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import __version__
from ..build import build_cfr_sam
from ..configs import CFRSAMConfig
from ..modeling.cfr_sam import CFRSAM
from .errors import ExportError
from .graphs import GRAPH_FILES, GRAPH_IO, OPSET, OPTIONAL_GRAPHS, example_args, run_stage, stage_module
from .manifest import BUNDLE_FORMAT, build_manifest, prompter_settings
from .onnx_files import NATIVE_OPSET, annotate, check_graph, export_onnx, store_initializers_fp16, to_opset19
from .parity import TOLERANCE, FixtureWriter, compare, parity_inputs, read_bin
from .weights import bundle_state_dict, file_sha256, model_sha256, round_to_fp16, state_dict_sha256


def export_bundle(
    model: CFRSAM,
    out_dir: str,
    name: Optional[str] = None,
    seed: int = 0,
    parity: bool = True,
    precision: str = "fp16",
    checkpoint_info: Optional[Dict[str, Any]] = None,
    include_full: bool = True,
    source: Optional[Dict[str, Any]] = None,
    include_weights: bool = True,
    native_deform_conv: bool = True,
) -> Dict[str, Any]:
    """Write the bundle into out_dir (created; existing bundle files replaced). Returns the manifest.

    With precision fp16 the model's weights are rounded to float16 in place first. With
    native_deform_conv, deformable layers that gain from it are ONNX DeformConv ops and their
    graphs import opset 19 (cfrsam.modeling.deform_conv); without, every graph is opset 17.
    """
    if precision not in ("fp16", "fp32"):
        raise ExportError(f"precision must be fp16 or fp32, got {precision!r}")
    if model.prompt_learner is None:
        raise ExportError("the model has no prompt learner; a bundle needs prompter.onnx")
    model.eval()
    if precision == "fp16":
        round_to_fp16(model)
    weights = bundle_state_dict(model, precision)
    weights_sha = state_dict_sha256(weights)
    prompter = prompter_settings(checkpoint_info or {})
    version = f"{__version__}+{model_sha256(weights_sha, model.config.to_dict(), prompter)[:12]}"

    os.makedirs(out_dir, exist_ok=True)
    for stale in list(GRAPH_FILES.values()) + ["manifest.json", "weights.pt"]:
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    if os.path.isdir(os.path.join(out_dir, "parity")):
        shutil.rmtree(os.path.join(out_dir, "parity"))
    if include_weights:
        torch.save(weights, os.path.join(out_dir, "weights.pt"))

    inputs = parity_inputs(model, seed=seed)
    graphs = [g for g in GRAPH_FILES if include_full or g != "decoder_prompts_full"]
    graphs = [g for g in graphs if g not in OPTIONAL_GRAPHS or g in inputs]
    graph_entries = {}
    for graph in graphs:
        path = os.path.join(out_dir, GRAPH_FILES[graph])
        export_onnx(stage_module(model, graph), example_args(inputs[graph], graph), graph, path, native_deform_conv)
        if precision == "fp16":
            store_initializers_fp16(path, graph, version)
        else:
            annotate(path, graph, version)
        opset = NATIVE_OPSET if to_opset19(path) else OPSET
        check_graph(path)
        graph_entries[graph] = {"file": GRAPH_FILES[graph], "sha256": file_sha256(path), "opset": opset}

    if parity:
        writer = FixtureWriter(os.path.join(out_dir, "parity"))
        for graph in graphs:
            outputs = run_stage(model, graph, inputs[graph])
            fixture = {
                "inputs": {n: writer.write(graph, n, inputs[graph][n]) for n in GRAPH_IO[graph][0]},
                "outputs": {n: writer.write(graph, n, outputs[n]) for n in GRAPH_IO[graph][1]},
                "tolerance": TOLERANCE[graph],
            }
            with open(os.path.join(out_dir, "parity", f"{graph}.json"), "w") as f:
                json.dump(fixture, f, indent=2)
                f.write("\n")

    manifest = build_manifest(
        model, name, version, weights_sha, seed, precision, graph_entries, checkpoint_info or {}, source or {}
    )
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def load_bundle_model(bundle_dir: str) -> Tuple[CFRSAM, Dict[str, Any]]:
    manifest_path = os.path.join(bundle_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise ExportError(f"{bundle_dir} is not a bundle (no manifest.json)")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ExportError(f"unsupported bundle format {manifest.get('format')!r}")
    prov = manifest["provenance"]
    cfg = CFRSAMConfig.from_dict(prov["config"]).validate()
    weights_path = os.path.join(bundle_dir, "weights.pt")
    if os.path.isfile(weights_path):
        weights = torch.load(weights_path, map_location="cpu", weights_only=False)
        what = "weights.pt"
    elif _regenerable(prov):
        # A random-init bundle without weights.pt: rebuild the weights from config and seed.
        model = build_cfr_sam(cfg, seed=prov["seed"])
        if prov.get("weights_precision", "fp16") == "fp16":
            round_to_fp16(model)
        weights = bundle_state_dict(model, prov.get("weights_precision", "fp16"))
        what = f"weights regenerated from seed {prov['seed']}"
    else:
        raise ExportError(
            f"{bundle_dir} has no weights.pt and was not exported from a seed alone; " "cannot re-run PyTorch"
        )
    sha = state_dict_sha256(weights)
    if sha != prov["weights_sha256"]:
        raise ExportError(f"{what}: sha256 {sha[:12]} does not match the manifest ({prov['weights_sha256'][:12]})")
    model = build_cfr_sam(
        cfg, checkpoint={"model": {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}}
    )
    return model, manifest


def bundle_checkpoint(bundle_dir: str) -> Dict[str, Any]:
    """A bundle read back as a CFR-SAM checkpoint dict: its weights (float16-rounded, widened to
    float32) and config, with what the manifest recorded from training (the prompter's tuned
    settings, the validation metrics, the training provenance). Training continues from it
    (`--init`), and exporting it again (`python -m cfrsam.export --checkpoint BUNDLE_DIR`) gives the
    same weights and version with the graphs of the current exporter."""
    model, manifest = load_bundle_model(bundle_dir)
    prov = manifest["provenance"]
    return {
        "format": "cfrsam-checkpoint/1",
        "config": model.config.to_dict(),
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "backbone_pretrained": bool(prov.get("backbone_pretrained", False)),
        "training": prov.get("training"),
        "metrics": manifest.get("metrics"),
        "prompter": {k: manifest["prompter"][k] for k in ("min_foreground", "nms_radius") if k in manifest["prompter"]},
        "bundle": {"path": str(bundle_dir), "version": manifest.get("version"), "source": prov.get("source")},
    }


def _regenerable(provenance: Dict[str, Any]) -> bool:
    source = provenance.get("source") or {}
    return (
        provenance.get("training") is None
        and not provenance.get("backbone_pretrained")
        and not source.get("checkpoint")
        and not source.get("sam_checkpoint")
    )


def check_bundle(bundle_dir: str, verbose: bool = True) -> List[str]:
    """Re-run PyTorch on the parity inputs; return a list of failures (empty = the bundle matches)."""
    model, manifest = load_bundle_model(bundle_dir)
    failures: List[str] = []
    for graph, entry in manifest["graphs"].items():
        path = os.path.join(bundle_dir, entry["file"])
        if not os.path.isfile(path):
            failures.append(f"{graph}: {entry['file']} missing")
        elif file_sha256(path) != entry["sha256"]:
            failures.append(f"{graph}: {entry['file']} sha256 differs from the manifest")
    parity_dir = os.path.join(bundle_dir, "parity")
    if not os.path.isdir(parity_dir):
        failures.append("no parity/ fixture")
        return failures
    for graph in manifest["graphs"]:
        fixture_path = os.path.join(parity_dir, f"{graph}.json")
        if not os.path.isfile(fixture_path):
            failures.append(f"{graph}: parity/{graph}.json missing")
            continue
        with open(fixture_path) as f:
            fixture = json.load(f)
        inputs = {n: read_bin(parity_dir, s) for n, s in fixture["inputs"].items()}
        outputs = run_stage(model, graph, inputs)
        tol = fixture["tolerance"]
        for name, spec in fixture["outputs"].items():
            ok, max_diff = compare(outputs[name], read_bin(parity_dir, spec), tol["atol"], tol["rtol"])
            if verbose:
                print(f"{graph}.{name}: max |diff| {max_diff:.3g} {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(
                    f"{graph}.{name}: max |diff| {max_diff:.3g} exceeds atol {tol['atol']} rtol {tol['rtol']}"
                )
    return failures


# ---- CLI ----------------------------------------------------------------------------------------
