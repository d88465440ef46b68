"""ONNX models made for tests (the real file format, loaded by onnxruntime)."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from inference.features import FEATURES


def constant_model(path, latency: float, error: float, *, features=FEATURES, input_name="X",
                   outputs=("latency", "error"), version="const") -> str:
    """An ONNX model predicting the same latency and error for every row."""
    F = len(features)
    nodes = [
        helper.make_node("ReduceSum", [input_name], ["s"], axes=[1], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["z", "c_lat"], [outputs[0]]),
        helper.make_node("Add", ["z", "c_err"], [outputs[1]]),
    ]
    graph = helper.make_graph(
        nodes, "const",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [None, F])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None]) for o in outputs],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("c_lat", TensorProto.FLOAT, [], [latency]),
         helper.make_tensor("c_err", TensorProto.FLOAT, [], [error])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    m.ir_version = 8
    for k, v in (("lb.features", ",".join(features)), ("lb.version", version)):
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(path))
    return str(path)


def inverted_model(path) -> str:
    """latency = the cell's own mean (harmless), error = 1 wherever the mean is
    under 10 ms: the fast backend is predicted to fail every request it gets,
    the slow one never.  The picks price errors by the prediction shrunk
    towards what each backend did (inference/policy.py `shrink`), so the fast
    backend keeps only the traffic that makes its observed record outweigh the
    prediction: most requests go to the slow one."""
    F = len(FEATURES)
    nodes = [
        helper.make_node("Gather", ["X", "col0"], ["x0"], axis=1),
        helper.make_node("Exp", ["x0"], ["latency"]),
        helper.make_node("Less", ["x0", "fast"], ["is_fast"]),
        helper.make_node("Cast", ["is_fast"], ["error"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "inverted",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, F])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None]) for o in ("latency", "error")],
        [helper.make_tensor("col0", TensorProto.INT64, [], [0]),
         helper.make_tensor("fast", TensorProto.FLOAT, [], [-4.6])])  # ln(10 ms)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    for k, v in (("lb.features", ",".join(FEATURES)), ("lb.version", "inverted")):
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(path))
    return str(path)
