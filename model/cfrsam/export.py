"""Export a CFR-SAM model bundle (ONNX graphs + manifest + parity fixture), and check one.

    python -m cfrsam.export --config tiny --out DIR [--checkpoint PT] [--sam-checkpoint PTH]
        [--seed 0] [--input-size N] [--refinement window|full] [--window 64] [--no-parity]
        [--name NAME] [--precision fp16|fp32] [--no-full] [--no-weights]
    python -m cfrsam.export --check DIR

The bundle layout, graph names and tensor names are the contract of docs/architecture.md.

Precision: with `fp16` (default) the weights are rounded to float16 once, before anything else;
weights.pt stores them as float16, the graphs are traced from the rounded float32 model and
every float32 initializer whose values are exactly representable in float16 is stored as float16
behind a Cast node (onnxruntime folds the Cast when the session is created). The graphs
therefore compute in float32 with exactly the weights of weights.pt, and parity and regeneration
from weights.pt agree; the files are half the size.

Parity fixture: parity/<graph>.json = {"inputs": {name: {"dims", "dtype", "file"}}, "outputs":
{...}, "tolerance": {"atol", "rtol"}} with raw little-endian .bin files. A file is shared between
graphs when the bytes are identical (e.g. the image is stored once); read the name from "file".
A value passes when |onnx - torch| <= atol + rtol * |torch| elementwise (int64: exact).
"""

import argparse
import datetime
import hashlib
import json
import os
import shutil
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from . import __version__
from .build import build_cfr_sam
from .checkpoint import CheckpointError, read_checkpoint
from .configs import CONFIG_NAMES, CFRSAMConfig, ConfigError
from .modeling.cfr_sam import CFRSAM
from .synthetic import normalise, synthetic_he_image

BUNDLE_FORMAT = "cfrsam-bundle/1"
OPSET = 17
# Prompt selection defaults the services apply to the prompter's output (not part of the graph).
PROMPTER_MIN_FOREGROUND = 0.5
PROMPTER_NMS_RADIUS = 4

GRAPH_FILES = {
    "prompter": "prompter.onnx",
    "encoder": "encoder.onnx",
    "decoder_image": "decoder_image.onnx",
    "decoder_prompts": "decoder_prompts.onnx",
    "decoder_prompts_full": "decoder_prompts_full.onnx",
}
GRAPH_IO = {
    "prompter": (["image"], ["points", "logits"]),
    "encoder": (["image"], ["features"]),
    "decoder_image": (["features", "image"], ["image_embedding", "semantic", "boundary_features"]),
    "decoder_prompts": (
        ["image_embedding", "semantic", "boundary_features", "point_coords", "point_labels"],
        ["mask_logits", "window_origin", "iou_predictions", "coarse_logits", "boundary_logits"],
    ),
}
GRAPH_IO["decoder_prompts_full"] = GRAPH_IO["decoder_prompts"]
DYNAMIC_AXES = {
    "prompter": {"image": {0: "B"}, "points": {0: "B"}, "logits": {0: "B"}},
    "encoder": {"image": {0: "B"}, "features": {0: "B"}},
    "decoder_image": {},
    "decoder_prompts": {
        "point_coords": {0: "P", 1: "N"},
        "point_labels": {0: "P", 1: "N"},
        "mask_logits": {0: "P"},
        "window_origin": {0: "P"},
        "iou_predictions": {0: "P"},
        "coarse_logits": {0: "P"},
        "boundary_logits": {0: "P"},
    },
}
DYNAMIC_AXES["decoder_prompts_full"] = DYNAMIC_AXES["decoder_prompts"]
# Per-graph parity tolerance (ORT CPU vs PyTorch CPU, float32): |d| <= atol + rtol * |torch|.
TOLERANCE = {
    "prompter": {"atol": 1e-3, "rtol": 1e-3},
    "encoder": {"atol": 1e-3, "rtol": 1e-3},
    "decoder_image": {"atol": 1e-3, "rtol": 1e-3},
    "decoder_prompts": {"atol": 2e-3, "rtol": 1e-3},
    "decoder_prompts_full": {"atol": 2e-3, "rtol": 1e-3},
}


class ExportError(Exception):
    """A user-facing export/check failure (printed without a traceback)."""


# ---- stage graphs -----------------------------------------------------------------------------


class PrompterGraph(nn.Module):
    def __init__(self, model: CFRSAM) -> None:
        super().__init__()
        self.learner = model.prompt_learner

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.learner(image)
        return out["points"], out["logits"]


class EncoderGraph(nn.Module):
    def __init__(self, model: CFRSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode(image)


class DecoderImageGraph(nn.Module):
    def __init__(self, model: CFRSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, image: torch.Tensor):
        return self.model.prepare(features, image)


class DecoderPromptsGraph(nn.Module):
    def __init__(self, model: CFRSAM, refinement: str) -> None:
        super().__init__()
        self.model = model
        self.refinement = refinement

    def forward(self, image_embedding, semantic, boundary_features, point_coords, point_labels):
        return self.model.decode_prompts(
            image_embedding, semantic, boundary_features, point_coords, point_labels, refinement=self.refinement
        )


def stage_module(model: CFRSAM, graph: str) -> nn.Module:
    if graph == "prompter":
        return PrompterGraph(model)
    if graph == "encoder":
        return EncoderGraph(model)
    if graph == "decoder_image":
        return DecoderImageGraph(model)
    if graph == "decoder_prompts":
        return DecoderPromptsGraph(model, model.config.bgmr.refinement)
    if graph == "decoder_prompts_full":
        return DecoderPromptsGraph(model, "full")
    raise KeyError(graph)


# ---- weights ----------------------------------------------------------------------------------


def round_to_fp16(model: nn.Module) -> None:
    """Round every float parameter and buffer to float16 precision (kept as float32)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype == torch.float32:
                t.copy_(t.half().float())


def bundle_state_dict(model: nn.Module, precision: str) -> Dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if precision == "fp16":
        sd = {k: v.half() if v.dtype == torch.float32 else v for k, v in sd.items()}
    return sd


def state_dict_sha256(state: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, little-endian bytes) of every tensor, by sorted name."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        arr = t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
        h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- ONNX -------------------------------------------------------------------------------------


def _export_onnx(module: nn.Module, args: Tuple[torch.Tensor, ...], graph: str, path: str) -> None:
    inputs, outputs = GRAPH_IO[graph]
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings flag Python-side constants (sizes fixed by the config): expected here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            path,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=DYNAMIC_AXES[graph],
            opset_version=OPSET,
            do_constant_folding=True,
        )


def _store_initializers_fp16(path: str, graph: str, version: str) -> None:
    """Store float32 initializers that are exact in float16 as float16 + Cast (lossless)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path)
    g = model.graph
    keep, casts = [], []
    for init in g.initializer:
        if init.data_type != TensorProto.FLOAT:
            keep.append(init)
            continue
        arr = numpy_helper.to_array(init)
        half = arr.astype(np.float16)
        if arr.size < 16 or not np.array_equal(half.astype(np.float32), arr):
            keep.append(init)
            continue
        half_name = init.name + "__fp16"
        keep.append(numpy_helper.from_array(half, half_name))
        casts.append(
            helper.make_node("Cast", [half_name], [init.name], to=TensorProto.FLOAT, name=init.name + "__cast")
        )
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    _set_metadata(model, graph, version)
    onnx.save(model, path)


def _annotate(path: str, graph: str, version: str) -> None:
    import onnx

    model = onnx.load(path)
    _set_metadata(model, graph, version)
    onnx.save(model, path)


def _set_metadata(model, graph: str, version: str) -> None:
    model.producer_name = "cfrsam"
    model.producer_version = version
    model.doc_string = f"CFR-SAM {graph} graph (docs/architecture.md)"
    del model.metadata_props[:]
    for key, value in (("cfrsam.graph", graph), ("cfrsam.version", version)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


# ---- parity fixture -----------------------------------------------------------------------------


def parity_prompts(size: int, centres: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Three prompts of two points: positive + padding, positive + negative, a box (corners 2/3)."""
    c = centres[:3] if len(centres) >= 3 else np.array([[0.3, 0.35], [0.6, 0.5], [0.75, 0.8]]) * size
    lim = size - 1.0
    p0 = [c[0], [0.0, 0.0]]
    p1 = [c[1], np.clip(c[1] + [9.0, 7.0], 0, lim)]
    p2 = [np.clip(c[2] - 7.0, 0, lim), np.clip(c[2] + 7.0, 0, lim)]
    coords = np.array([p0, p1, p2], dtype=np.float32)
    labels = np.array([[1, -1], [1, 0], [2, 3]], dtype=np.float32)
    return coords, labels


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _dtype_name(arr: np.ndarray) -> str:
    if arr.dtype == np.float32:
        return "float32"
    if arr.dtype == np.int64:
        return "int64"
    raise ExportError(f"unsupported parity dtype {arr.dtype}")


class _FixtureWriter:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.by_digest: Dict[str, str] = {}
        os.makedirs(directory, exist_ok=True)

    def write(self, graph: str, name: str, arr: np.ndarray) -> Dict[str, Any]:
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        digest = hashlib.sha256(data + _dtype_name(arr).encode()).hexdigest()
        if digest not in self.by_digest:
            fname = f"{graph}.{name}.bin"
            with open(os.path.join(self.directory, fname), "wb") as f:
                f.write(data)
            self.by_digest[digest] = fname
        return {"dims": list(arr.shape), "dtype": _dtype_name(arr), "file": self.by_digest[digest]}


def _run_stage(model: CFRSAM, graph: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    module = stage_module(model, graph).eval()
    names_in, names_out = GRAPH_IO[graph]
    with torch.no_grad():
        out = module(*[torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names_in])
    if isinstance(out, torch.Tensor):
        out = (out,)
    return {n: _to_numpy(t) for n, t in zip(names_out, out)}


def parity_inputs(model: CFRSAM, seed: int = 0) -> Dict[str, Dict[str, np.ndarray]]:
    """Deterministic inputs for every graph (decoder inputs come from the previous stages)."""
    cfg = model.config
    size = cfg.input_size
    rgb, centres = synthetic_he_image(size, seed=seed)
    image = normalise(rgb, cfg.pixel_mean, cfg.pixel_std)
    features = _run_stage(model, "encoder", {"image": image})["features"]
    prepared = _run_stage(model, "decoder_image", {"features": features, "image": image})
    coords, labels = parity_prompts(size, centres)
    prompts = dict(prepared, point_coords=coords, point_labels=labels)
    return {
        "prompter": {"image": image},
        "encoder": {"image": image},
        "decoder_image": {"features": features, "image": image},
        "decoder_prompts": prompts,
        "decoder_prompts_full": prompts,
    }


def example_args(inputs: Dict[str, np.ndarray], graph: str) -> Tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in GRAPH_IO[graph][0])


# ---- bundle -----------------------------------------------------------------------------------


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
) -> Dict[str, Any]:
    """Write the bundle into out_dir (created; existing bundle files replaced). Returns the manifest.

    With precision fp16 the model's weights are rounded to float16 in place first.
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
    version = f"{__version__}+{weights_sha[:12]}"

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
    graph_entries = {}
    for graph in graphs:
        path = os.path.join(out_dir, GRAPH_FILES[graph])
        _export_onnx(stage_module(model, graph), example_args(inputs[graph], graph), graph, path)
        if precision == "fp16":
            _store_initializers_fp16(path, graph, version)
        else:
            _annotate(path, graph, version)
        import onnx

        onnx.checker.check_model(path)
        graph_entries[graph] = {"file": GRAPH_FILES[graph], "sha256": file_sha256(path)}

    if parity:
        writer = _FixtureWriter(os.path.join(out_dir, "parity"))
        for graph in graphs:
            outputs = _run_stage(model, graph, inputs[graph])
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


def build_manifest(
    model: CFRSAM,
    name: Optional[str],
    version: str,
    weights_sha: str,
    seed: int,
    precision: str,
    graph_entries: Dict[str, Any],
    checkpoint_info: Dict[str, Any],
    source: Dict[str, Any],
) -> Dict[str, Any]:
    cfg = model.config
    size = cfg.input_size
    learner_cfg = model.prompt_learner.cfg
    window = cfg.refinement_window()
    prepared_shapes = {
        "image_embedding": [1, cfg.image_encoder.out_chans, cfg.grid_size, cfg.grid_size],
        "semantic": [1, model.bgmr.semantic_dim, size // 4, size // 4],
        "boundary_features": [1, model.bgmr.boundary_dim, size, size],
    }
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
        if epoch
        else datetime.datetime.now(datetime.timezone.utc)
    )
    return {
        "format": BUNDLE_FORMAT,
        "name": name or f"cfrsam-{cfg.name}",
        "version": version,
        "config": cfg.name,
        "input_size": size,
        "patch_size": cfg.image_encoder.patch_size,
        "normalization": {"mean": list(cfg.pixel_mean), "std": list(cfg.pixel_std)},
        "classes": [{"name": n, "color": c} for n, c in zip(cfg.class_names, cfg.class_colors)],
        "mpp": cfg.mpp,
        "hmfm_levels": list(cfg.hmfm.levels),
        "feature_shape": cfg.feature_shape(),
        "prepared_shapes": prepared_shapes,
        "refinement": {
            "mode": cfg.bgmr.refinement,
            "window": window,
            "exact_margin": min(model.bgmr.window_margin(), window // 2),
        },
        "mask_threshold": cfg.mask_threshold,
        "prompter": {
            "anchors": learner_cfg.num_anchors,
            # Tuned on validation when training recorded them (cfrsam.train.tune_prompter).
            "min_foreground": float(
                (checkpoint_info.get("prompter") or {}).get("min_foreground", PROMPTER_MIN_FOREGROUND)
            ),
            "nms_radius": float((checkpoint_info.get("prompter") or {}).get("nms_radius", PROMPTER_NMS_RADIUS)),
        },
        "graphs": graph_entries,
        "provenance": {
            "config": cfg.to_dict(),
            "weights_sha256": weights_sha,
            "weights_precision": precision,
            "seed": seed,
            "torch": torch.__version__.split("+")[0],
            "onnx_opset": OPSET,
            "exported_at": now.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "backbone_pretrained": bool(getattr(model, "backbone_pretrained", False)),
            "source": source,
            "training": checkpoint_info.get("training"),
        },
        "metrics": checkpoint_info.get("metrics") or {},
    }


# ---- check ------------------------------------------------------------------------------------


def _read_bin(directory: str, spec: Dict[str, Any]) -> np.ndarray:
    dtype = {"float32": "<f4", "int64": "<i8"}[spec["dtype"]]
    arr = np.fromfile(os.path.join(directory, spec["file"]), dtype=dtype)
    expected = int(np.prod(spec["dims"])) if spec["dims"] else 1
    if arr.size != expected:
        raise ExportError(f"{spec['file']}: {arr.size} values, dims {spec['dims']} need {expected}")
    return arr.reshape(spec["dims"]).astype(arr.dtype.newbyteorder("="))


def compare(actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> Tuple[bool, float]:
    if actual.shape != expected.shape:
        return False, float("inf")
    if expected.dtype.kind in "iu":
        diff = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
        return bool((diff == 0).all()), float(diff.max()) if diff.size else 0.0
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    ok = bool((diff <= atol + rtol * np.abs(expected.astype(np.float64))).all())
    return ok, float(diff.max()) if diff.size else 0.0


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
        weights = torch.load(weights_path, map_location="cpu")
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
        inputs = {n: _read_bin(parity_dir, s) for n, s in fixture["inputs"].items()}
        outputs = _run_stage(model, graph, inputs)
        tol = fixture["tolerance"]
        for name, spec in fixture["outputs"].items():
            ok, max_diff = compare(outputs[name], _read_bin(parity_dir, spec), tol["atol"], tol["rtol"])
            if verbose:
                print(f"{graph}.{name}: max |diff| {max_diff:.3g} {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(
                    f"{graph}.{name}: max |diff| {max_diff:.3g} exceeds atol {tol['atol']} rtol {tol['rtol']}"
                )
    return failures


# ---- CLI ----------------------------------------------------------------------------------------


def _bundle_size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    with torch.no_grad():
        return _main(argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cfrsam.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help=f"config name ({', '.join(CONFIG_NAMES)}); default: the checkpoint's")
    p.add_argument("--out", help="bundle directory to write")
    p.add_argument("--checkpoint", help="CFR-SAM checkpoint (ours)")
    p.add_argument("--sam-checkpoint", help="official SAM checkpoint (sam_vit_*.pth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-size", type=int)
    p.add_argument("--refinement", choices=("window", "full"))
    p.add_argument("--window", type=int)
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--no-full", action="store_true", help="skip decoder_prompts_full.onnx")
    p.add_argument(
        "--no-weights",
        action="store_true",
        help="omit weights.pt (a random-init bundle is then checked by regenerating from the seed)",
    )
    p.add_argument("--name")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--check", metavar="DIR", help="check DIR's parity fixture against PyTorch")
    args = p.parse_args(argv)
    try:
        if args.check:
            failures = check_bundle(args.check)
            if failures:
                print(f"{args.check}: {len(failures)} check(s) failed:", file=sys.stderr)
                for failure in failures:
                    print(f"  {failure}", file=sys.stderr)
                return 1
            print(f"{args.check}: bundle matches PyTorch")
            return 0
        if not args.out:
            raise ExportError("--out DIR is required (or --check DIR)")
        if not args.config and not args.checkpoint:
            raise ExportError("--config is required unless --checkpoint records a config")
        ckpt = read_checkpoint(args.checkpoint) if args.checkpoint else None
        model = build_cfr_sam(
            args.config,
            checkpoint=ckpt,
            sam_checkpoint=args.sam_checkpoint,
            seed=args.seed,
            input_size=args.input_size,
            refinement=args.refinement,
            window=args.window,
        )
        source = {
            "checkpoint": os.path.basename(args.checkpoint) if args.checkpoint else None,
            "sam_checkpoint": os.path.basename(args.sam_checkpoint) if args.sam_checkpoint else None,
        }
        manifest = export_bundle(
            model,
            args.out,
            name=args.name,
            seed=args.seed,
            parity=not args.no_parity,
            precision=args.precision,
            checkpoint_info=ckpt or {},
            include_full=not args.no_full,
            source=source,
            include_weights=not args.no_weights,
        )
        size = _bundle_size(args.out)
        print(f"wrote {args.out}: {manifest['name']} {manifest['version']} ({size / 1e6:.1f} MB)")
        return 0
    except (ExportError, ConfigError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
