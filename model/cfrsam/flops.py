"""Floating-point work of each stage graph of a bundle, counted by PyTorch's profiler, and a MatMul
graph to measure the CPU's attainable peak with the same runtime (bench/stages.mjs --flops).

    python -m cfrsam.flops --bundle ../models/tiny --prompts 16 --out /tmp/flops.json

FLOPs are 2 x multiply-accumulates of the matrix products and convolutions (aten mm, addmm, bmm,
conv; the profiler's with_flops counters) on the parity inputs: one S x S tile for prompter,
encoder and decoder_image, `--prompts` one-point prompts for decoder_prompts. Element-wise work,
normalisation and grid sampling are not counted: they are memory-bound and small in FLOPs, so the
fractions of peak are of the arithmetic that a faster kernel or lower precision could speed up.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from .export import GRAPH_IO, ExportError, load_bundle_model, parity_inputs, stage_module

PEAK_MATMUL_SIZE = 1024


def graph_flops(model, prompts: int) -> dict:
    """{graph: FLOPs} for the stage graphs of `model` at one tile and `prompts` prompts."""
    inputs = parity_inputs(model)
    size = model.config.input_size
    coords = np.stack([np.linspace(16, size - 16, prompts), np.linspace(size - 16, 16, prompts)], axis=1)
    decoder_inputs = dict(
        inputs["decoder_prompts"],
        point_coords=coords.astype(np.float32).reshape(prompts, 1, 2),
        point_labels=np.ones((prompts, 1), dtype=np.float32),
    )
    inputs["decoder_prompts"] = decoder_inputs
    graphs = ["prompter", "encoder", "decoder_image", "decoder_prompts"]
    if model.point_refiner is not None:
        # As many points as prompts: the refiner runs once per kept point, like the decoder.
        inputs["point_refiner"] = dict(
            inputs["point_refiner"],
            points=coords.astype(np.float32),
            image_index=np.zeros(prompts, dtype=np.int64),
        )
        graphs.append("point_refiner")
    out = {}
    for graph in graphs:
        module = stage_module(model, graph).eval()
        args = [torch.from_numpy(np.ascontiguousarray(inputs[graph][n])) for n in GRAPH_IO[graph][0]]
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            module(*args)
        out[graph] = int(sum(e.flops for e in prof.key_averages() if e.flops))
    return out


def write_matmul_graph(path: str, n: int = PEAK_MATMUL_SIZE) -> int:
    """An n x n x n float32 MatMul (B is an initializer) for the runtime's peak; returns its FLOPs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    b = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul_peak",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        initializer=[b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return 2 * n * n * n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="../models/tiny")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--out", required=True, help="JSON file to write (the MatMul graph goes beside it)")
    args = parser.parse_args(argv)
    try:
        model, manifest = load_bundle_model(args.bundle)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flops = graph_flops(model, args.prompts)
    matmul_path = os.path.splitext(args.out)[0] + ".matmul.onnx"
    result = {
        "bundle": manifest["version"],
        "prompts": args.prompts,
        "flops": flops,
        "matmul": {"file": os.path.abspath(matmul_path), "flops": write_matmul_graph(matmul_path)},
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for graph, value in flops.items():
        print(f"{graph:16s} {value / 1e9:8.3f} GFLOP")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
