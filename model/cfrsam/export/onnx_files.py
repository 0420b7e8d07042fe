"""Writing the ONNX files: tracing, lossless float16 initializers and the cfrsam metadata."""

import warnings
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn

from .graphs import DYNAMIC_AXES, GRAPH_IO, OPSET


def export_onnx(module: nn.Module, args: Tuple[torch.Tensor, ...], graph: str, path: str) -> None:
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


def store_initializers_fp16(path: str, graph: str, version: str) -> None:
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


def annotate(path: str, graph: str, version: str) -> None:
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
