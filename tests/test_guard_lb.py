"""The ml guard in a running lb: a model that routes badly is caught.

The model below inverts what it sees (a backend that answered fast is
predicted slow and the other way round), and the confidence check that would
otherwise catch so wrong a model is turned off, so only the guard stands
between it and the traffic.  The guard's P2C-EWMA control share does far
better on the same two backends, and every worker falls back with reason
`guard` (log event `policy_mode`, and the admin's /metrics)."""

from __future__ import annotations

import http.client
import threading
import time

import onnx
from onnx import TensorProto, helper

from inference.features import FEATURES
from tests.conftest import get


def inverted_model(path) -> str:
    """latency = exp(-lat_ewma_log - 10): 1 ms observed -> 22 ms predicted, 30 ms -> 1.5 ms."""
    F = len(FEATURES)
    nodes = [
        helper.make_node("Gather", ["X", "col0"], ["x0"], axis=1),
        helper.make_node("Neg", ["x0"], ["nx0"]),
        helper.make_node("Add", ["nx0", "shift"], ["lg"]),
        helper.make_node("Exp", ["lg"], ["latency"]),
        helper.make_node("Mul", ["x0", "zero"], ["error"]),
    ]
    graph = helper.make_graph(
        nodes, "inverted",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, F])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None]) for o in ("latency", "error")],
        [helper.make_tensor("col0", TensorProto.INT64, [], [0]),
         helper.make_tensor("shift", TensorProto.FLOAT, [], [-10.0]),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    for k, v in (("lb.features", ",".join(FEATURES)), ("lb.version", "inverted")):
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(path))
    return str(path)


def test_a_model_that_routes_badly_is_caught_by_the_guard(lb_factory, servers, tmp_path):
    fast = servers("fast")
    slow = servers("slow", delay=0.03)
    model = inverted_model(tmp_path / "inverted.onnx")
    lines = "\n".join(f'[[backends]]\naddress = "{s.address}"\nname = "{s.name}"' for s in (fast, slow))
    lb = lb_factory([], strategy="ml", workers=2, backend_lines=lines,
                    extra=f'[learning]\nmodel = "{model}"\nguard_share = 0.2\nmax_prediction_error = 1000.0')
    assert get(lb.port)[0] == 200
    stop = threading.Event()

    def load() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
        while not stop.is_set():
            conn.request("GET", "/")
            conn.getresponse().read()
        conn.close()

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        modes = lambda: [(e["mode"], e["reason"]) for e in lb.log.events("policy_mode")]  # noqa: E731
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and modes().count(("fallback", "guard")) < 2:
            lb.log.wait_for("policy_mode", len(modes()) + 1, timeout=max(0.1, deadline - time.monotonic()))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    seen = modes()
    # the table did route first (the model is trusted: no low_confidence), then both workers caught it
    assert ("learned", "") in seen, seen
    assert seen.count(("fallback", "guard")) == 2, seen
    assert not any(r == "low_confidence" for _, r in seen), seen
