"""Dynamic int8 quantisation of weight MatMuls (cfrsam.export.quantize) on a hand-built graph."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cfrsam.export.quantize import quantize_matmuls


def _graph(weight: np.ndarray, small: np.ndarray) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Cast", ["W16"], ["W"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["A", "W"], ["H"], name="big"),
        helper.make_node("MatMul", ["H", "S"], ["Y"], name="small"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, weight.shape[0]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, small.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float16), "W16"), numpy_helper.from_array(small, "S")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weight_matmul_becomes_dynamic_quantize_matmul_with_per_column_int8():
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.05, (64, 128)).astype(np.float32)
    weight[:, 3] *= 20  # a column with a larger range gets its own scale
    small = rng.normal(0, 1, (128, 4)).astype(np.float32)
    model = _graph(weight, small)
    assert quantize_matmuls(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["DynamicQuantizeMatMul", "MatMul"]  # the Cast of the float weight is gone
    node = model.graph.node[0]
    assert node.domain == "com.microsoft" and list(node.input)[0] == "A"
    assert any(o.domain == "com.microsoft" for o in model.opset_import)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert "W16" not in inits  # the float weight is not stored twice
    q, scale, zero = (inits[name] for name in node.input[1:4])
    assert q.dtype == np.int8 and q.shape == (64, 128)
    assert scale.shape == (128,) and not zero.any()
    assert scale[3] > 10 * np.median(scale)
    w16 = weight.astype(np.float16).astype(np.float32)
    assert np.all(np.abs(q * scale - w16) <= scale / 2 + 1e-7)
    onnx.checker.check_model(model)
