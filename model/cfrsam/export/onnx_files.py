"""Writing the ONNX files: tracing, lossless float16 initializers and the cfrsam metadata."""

import warnings
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn

from ..modeling.deform_conv import NATIVE_OP_DOMAIN, native_deform_conv_export
from .graphs import DYNAMIC_AXES, GRAPH_IO, OPSET

#: The opset of a graph holding ONNX's DeformConv (added in opset 19).
NATIVE_OPSET = 19

# Reductions whose `axes` moved from an attribute to an input in opset 18 (ReduceSum did in 13).
_AXES_TO_INPUT_AT_18 = {
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
}


def export_onnx(
    module: nn.Module, args: Tuple[torch.Tensor, ...], graph: str, path: str, native_deform_conv: bool = True
) -> None:
    """Trace `module` to `path` at OPSET; with native_deform_conv, the deformable layers that gain
    from it are traced as DeformConv placeholders (see cfrsam.modeling.deform_conv) for to_opset19."""
    inputs, outputs = GRAPH_IO[graph]
    module.eval()
    with torch.no_grad(), warnings.catch_warnings(), native_deform_conv_export(native_deform_conv):
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
            custom_opsets={NATIVE_OP_DOMAIN: 1},
        )


def to_opset19(path: str) -> bool:
    """Makes the DeformConv placeholders standard ops: the file then imports opset 19, with the
    one change between 17 and 19 that touches what torch 1.13 emits applied (reductions take
    `axes` as an input). Every other op it emits means the same at 19. Returns False, leaving the
    file as it is, when it holds no placeholder. The installed onnx (1.12) knows opsets up to 17,
    so such a file is checked by onnxruntime (the bundle's parity fixture), not by onnx.checker."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    g = model.graph
    if not any(n.domain == NATIVE_OP_DOMAIN for n in g.node):
        return False
    for node in g.node:
        if node.domain == NATIVE_OP_DOMAIN:
            node.domain = ""
        elif node.op_type in _AXES_TO_INPUT_AT_18 and node.domain in ("", "ai.onnx"):
            axes = [a for a in node.attribute if a.name == "axes"]
            if axes:
                name = f"{node.name or node.output[0]}__axes"
                g.initializer.append(numpy_helper.from_array(np.array(axes[0].ints, dtype=np.int64), name))
                node.input.append(name)
                node.attribute.remove(axes[0])
    imports = [o for o in model.opset_import if o.domain not in ("", "ai.onnx", NATIVE_OP_DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", NATIVE_OPSET), *imports])
    onnx.save(model, path)
    return True


def check_graph(path: str) -> None:
    """onnx.checker where the installed onnx knows the file's opset; for a to_opset19 file under
    an older onnx (1.12 here), the structure that conversion promises: opset 19, no placeholder
    left, every reduction's axes an input. onnxruntime runs such a file in the parity tests."""
    import onnx

    model = onnx.load(path)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset <= onnx.defs.onnx_opset_version():
        onnx.checker.check_model(model)
        return
    if opset != NATIVE_OPSET:
        raise ValueError(f"{path}: opset {opset}, expected {OPSET} or {NATIVE_OPSET}")
    for node in model.graph.node:
        if node.domain == NATIVE_OP_DOMAIN:
            raise ValueError(f"{path}: placeholder {node.op_type} ({node.name}) left in the graph")
        if node.op_type in _AXES_TO_INPUT_AT_18 and any(a.name == "axes" for a in node.attribute):
            raise ValueError(f"{path}: {node.name} still has an axes attribute (opset 18 takes an input)")


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
