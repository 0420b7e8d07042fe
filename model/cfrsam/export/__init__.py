"""Export a CFR-SAM model bundle (ONNX graphs + manifest + parity fixture), and check one.

    python -m cfrsam.export --config tiny --out DIR [--checkpoint PT|BUNDLE_DIR] [--sam-checkpoint PTH]
        [--seed 0] [--input-size N] [--refinement window|full] [--window 64] [--no-parity]
        [--name NAME] [--precision fp16|fp32] [--no-full] [--no-weights]
    python -m cfrsam.export --check DIR

`--checkpoint` may name an exported bundle: its weights, config, tuned prompter settings, metrics
and training provenance are exported again with the current exporter (same weights and version;
with `--window W` the version changes, since it hashes the config).

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

from .bundle import bundle_checkpoint, check_bundle, export_bundle, load_bundle_model
from .cli import main
from .errors import ExportError
from .graphs import DYNAMIC_AXES, GRAPH_FILES, GRAPH_IO, OPSET, example_args, run_stage, stage_module
from .manifest import BUNDLE_FORMAT, PROMPTER_MIN_FOREGROUND, PROMPTER_NMS_RADIUS, build_manifest
from .parity import TOLERANCE, compare, parity_inputs, parity_prompts
from .weights import bundle_state_dict, file_sha256, round_to_fp16, state_dict_sha256

__all__ = [
    "BUNDLE_FORMAT",
    "DYNAMIC_AXES",
    "GRAPH_FILES",
    "GRAPH_IO",
    "OPSET",
    "PROMPTER_MIN_FOREGROUND",
    "PROMPTER_NMS_RADIUS",
    "TOLERANCE",
    "ExportError",
    "build_manifest",
    "bundle_checkpoint",
    "bundle_state_dict",
    "check_bundle",
    "compare",
    "example_args",
    "export_bundle",
    "file_sha256",
    "load_bundle_model",
    "main",
    "parity_inputs",
    "parity_prompts",
    "round_to_fp16",
    "run_stage",
    "stage_module",
    "state_dict_sha256",
]
