"""Dynamic int8 quantisation of a bundle's stage graphs (a bundle variant for CPUs with VNNI).

Every MatMul whose second input is a weight (an initializer, possibly behind a Cast) becomes
onnxruntime's ``com.microsoft.DynamicQuantizeMatMul``: the weight is stored as int8, symmetric,
one scale per output column; the activation is quantised to uint8 at run time, per tensor. This
is what ``onnxruntime.quantization.quantize_dynamic`` does for MatMul (that package is not
installable here, and the rewrite is small). Convolutions stay float32: the convolutions of these
graphs have few channels (16 at 64 x 64 in the refinement window), where int8 kernels gain little.

The variant is a full bundle: graphs, manifest (``variant`` and new graph digests), weights and
parity fixtures are copied, and its accuracy is reported against the float32 bundle by running
the same validation through the services (README, Benchmarks).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .weights import file_sha256

MS_DOMAIN = "com.microsoft"


def _weight_of(name: str, producers: dict, initializers: dict):
    """The float32 array behind `name` (an initializer, or an initializer behind Casts), or None."""
    seen = 0
    while name not in initializers and name in producers and seen < 4:
        node = producers[name]
        if node.op_type != "Cast":
            return None
        name = node.input[0]
        seen += 1
    if name not in initializers:
        return None
    return numpy_helper.to_array(initializers[name]).astype(np.float32)


def quantize_matmuls(model: onnx.ModelProto, min_elements: int = 4096) -> int:
    """Rewrites the model's weight MatMuls in place; returns how many were rewritten."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {i.name: i for i in graph.initializer}
    rewritten = 0
    nodes = []
    for node in graph.node:
        weight = _weight_of(node.input[1], producers, initializers) if node.op_type == "MatMul" else None
        if weight is None or weight.ndim != 2 or weight.size < min_elements:
            nodes.append(node)
            continue
        # Symmetric int8, one scale per output column (the columns of B).
        scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127.0
        q = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
        base = f"{node.name or node.output[0]}_int8"
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{base}/B"),
                numpy_helper.from_array(scale.astype(np.float32), f"{base}/scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}/zero_point"),
            ]
        )
        nodes.append(
            helper.make_node(
                "DynamicQuantizeMatMul",
                [node.input[0], f"{base}/B", f"{base}/scale", f"{base}/zero_point"],
                list(node.output),
                name=base,
                domain=MS_DOMAIN,
            )
        )
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    if rewritten and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _drop_unused_initializers(graph)
    return rewritten


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Removes the Casts that fed the float weights (now read by nothing), then those weights."""

    def used() -> set:
        return {i for n in graph.node for i in n.input} | {o.name for o in graph.output}

    while True:
        live = used()
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in live for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    live = used()
    keep = [i for i in graph.initializer if i.name in live]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def quantize_bundle(bundle: Path, out: Path, graphs: list[str]) -> dict:
    """Copies `bundle` to `out` with `graphs` quantised; returns {graph: MatMuls rewritten}."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out)
    manifest = json.loads((bundle / "manifest.json").read_text())
    counts = {}
    for name in graphs:
        entry = manifest["graphs"][name]
        path = out / entry["file"]
        model = onnx.load(str(path))
        counts[name] = quantize_matmuls(model)
        onnx.save(model, str(path))
        entry["sha256"] = file_sha256(str(path))
    manifest["variant"] = {"kind": "int8-dynamic", "graphs": counts, "from": manifest["version"]}
    manifest["version"] = f"{manifest['version']}-int8"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="float32 bundle directory")
    parser.add_argument("--out", required=True, help="the int8 bundle directory (replaced)")
    parser.add_argument(
        "--graphs", default="encoder,decoder_prompts,decoder_prompts_full", help="graphs to quantise (comma-separated)"
    )
    args = parser.parse_args(argv)
    counts = quantize_bundle(Path(args.bundle), Path(args.out), [g for g in args.graphs.split(",") if g])
    print(json.dumps({"out": args.out, "matmuls_quantised": counts}))


if __name__ == "__main__":
    main()
