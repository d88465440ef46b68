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
