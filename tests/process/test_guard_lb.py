"""A model that routes badly, in a running lb: caught by its record, and by
the guard.

The model below predicts that the fast backend (5 ms) fails every request (it
never does), and the confidence check (of its latency predictions) is turned
off.  By default its error predictions count only as far as they foretold
what each backend then did (`learning.model_errors = "earned"`,
inference/policy.py `ErrorRecord`): the lie loses its weight on the first
answers, and the fast backend gets the traffic.  With the model's error
predictions always counted (`"always"`: shrunk towards each backend's record
only, so the lie holds where the record is thin), at two clients' worth of
traffic the table sends a good share of the requests to the slow backend
(30 ms); the guard's P2C-EWMA control share does far better on the same two
backends, and the worker falls back with reason `guard` (log event
`policy_mode`, and the admin's /metrics)."""

from __future__ import annotations

import http.client
import json
import threading
import time

from tests.models import inverted_model
from tests.rawhttp import get


def with_inverted_model(lb_factory, servers, tmp_path, learning: str):
    """A fast (5 ms) and a slow (30 ms) backend behind one ml worker with the
    inverted model, its confidence check off; `learning`: more of the section.
    Returns (lb, fast)."""
    fast = servers("fast", delay=0.005)
    slow = servers("slow", delay=0.03)
    model = inverted_model(tmp_path / "inverted.onnx")
    lines = "\n".join(f'[[backends]]\naddress = "{s.address}"\nname = "{s.name}"' for s in (fast, slow))
    lb = lb_factory([], strategy="ml", workers=1, backend_lines=lines,
                    extra=f'[learning]\nmodel = "{model}"\nmax_prediction_error = 1000.0\n{learning}')
    assert get(lb.port)[0] == 200
    return lb, fast


def fast_shares(lb_factory, servers, tmp_path, model_errors: str, batches: int,
                done) -> tuple[list, list]:
    """One client's requests in batches of 50 once the worker routes by the
    table: the fast backend's share of each batch, and the worker's modes.
    At most `batches`, fewer once `done(shares, lb)`."""
    lb, fast = with_inverted_model(lb_factory, servers, tmp_path, f'model_errors = "{model_errors}"')
    events = lambda: lb.log.events("policy_mode")  # noqa: E731
    # the worker's (with a slot; the inference process logs its own)
    modes = lambda: [(e["mode"], e["reason"]) for e in events() if "slot" in e]  # noqa: E731
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ("learned", "") not in modes():
        lb.log.wait_for("policy_mode", len(events()) + 1, timeout=max(0.1, deadline - time.monotonic()))
    assert ("learned", "") in modes()  # the table routes from here
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    shares = []
    for _ in range(batches):
        before = fast.hits
        for _ in range(50):
            conn.request("GET", "/")
            r = conn.getresponse()
            r.read()
            assert r.status == 200
        shares.append((fast.hits - before) / 50)
        if done(shares, lb):
            break
    conn.close()
    return shares, modes()


def error_weight(lb) -> dict:
    """The latest table's weight of the model's error predictions, per backend
    (/api/route; empty while no table prices errors)."""
    status, _, body = get(lb.admin_port, "/api/route")
    assert status == 200
    table = json.loads(body)["table"] or {}
    return table.get("error_weight", {}) if table.get("mode") == "learned" else {}


def test_a_model_whose_error_predictions_lie_loses_their_weight(lb_factory, servers, tmp_path):
    """By default the lie is judged against the fast backend's answers and
    loses its weight there: the tables price the model's error predictions
    (the admin shows their weight), the fast backend's falls towards 0, and
    the fast backend takes the traffic."""
    seen: list[dict] = []  # the error weights after each batch
    # before the last three batches, a table priced the model's errors with the
    # lie's weight on the fast backend gone
    lie_gone = lambda: any(w.get("fast", 1.0) < 0.05 for w in seen[:-3])  # noqa: E731

    def priced(shares, lb) -> bool:
        seen.append(error_weight(lb))
        return len(shares) >= 3 and min(shares[-3:]) >= 0.9 and lie_gone()

    shares, modes = fast_shares(lb_factory, servers, tmp_path, "earned", batches=20, done=priced)
    assert lie_gone(), seen
    assert len(shares) >= 3 and min(shares[-3:]) >= 0.9, shares
    assert ("fallback", "guard") not in modes, modes


def test_with_the_models_error_predictions_always_counted_the_lie_routes(lb_factory, servers, tmp_path):
    """The same, the model's error predictions always counted: one client's
    record of the fast backend stays thin, and the table keeps most requests
    on the slow one (which the guard below catches, given time).  The
    first tables price no errors (the inference process warms up), and on a
    busy host the first that do can come after a few batches: the lie must
    route three batches in a row within twenty."""
    shares, _ = fast_shares(lb_factory, servers, tmp_path, "always", batches=20,
                            done=lambda shares, lb: len(shares) >= 3 and max(shares[-3:]) < 0.5)
    assert len(shares) >= 3 and max(shares[-3:]) < 0.5, shares


def test_a_model_that_routes_badly_is_caught_by_the_guard(lb_factory, servers, tmp_path):
    # one worker: with two, the first to fall back sends the fast backend enough
    # traffic for its record to outweigh the prediction for both, and the
    # other's table arm recovers (that is the shrink working)
    lb, _ = with_inverted_model(lb_factory, servers, tmp_path, 'guard_share = 0.2\nmodel_errors = "always"')
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
