"""The ml guard in a running lb: a model that routes badly is caught.

The model below predicts that the fast backend (5 ms) fails every request (it
never does), and the confidence check is turned off, so only the guard stands
between it and the traffic.  Errors are priced by the prediction shrunk
towards each backend's record, so the lie only holds where the record is
thin: at two clients' worth of traffic the table sends a good share of the
requests to the slow backend (30 ms), the guard's P2C-EWMA control share does
far better on the same two backends, and the worker falls back with reason
`guard` (log event `policy_mode`, and the admin's /metrics)."""

from __future__ import annotations

import http.client
import threading
import time

import onnx
from onnx import TensorProto, helper

from inference.features import FEATURES
from tests.rawhttp import get


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


def test_a_model_that_routes_badly_is_caught_by_the_guard(lb_factory, servers, tmp_path):
    fast = servers("fast", delay=0.005)
    slow = servers("slow", delay=0.03)
    model = inverted_model(tmp_path / "inverted.onnx")
    lines = "\n".join(f'[[backends]]\naddress = "{s.address}"\nname = "{s.name}"' for s in (fast, slow))
    # one worker: with two, the first to fall back sends the fast backend enough
    # traffic for its record to outweigh the prediction for both, and the
    # other's table arm recovers (that is the shrink working)
    lb = lb_factory([], strategy="ml", workers=1, backend_lines=lines,
                    extra=f'[learning]\nmodel = "{model}"\nguard_share = 0.2\nmax_prediction_error = 1000.0')
    assert get(lb.port)[0] == 200
    stop = threading.Event()

    def load() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
        while not stop.is_set():
            conn.request("GET", "/")
            conn.getresponse().read()
        conn.close()

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        modes = lambda: [(e["mode"], e["reason"]) for e in lb.log.events("policy_mode")]  # noqa: E731
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and modes().count(("fallback", "guard")) < 1:
            lb.log.wait_for("policy_mode", len(modes()) + 1, timeout=max(0.1, deadline - time.monotonic()))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    seen = modes()
    # the table did route first (the model is trusted: no low_confidence), then the worker caught it
    assert ("learned", "") in seen, seen
    assert seen.count(("fallback", "guard")) >= 1, seen
    assert not any(r == "low_confidence" for _, r in seen), seen
