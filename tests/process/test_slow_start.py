"""Slow start: a backend back from an ejection ramps up its share over
`balancer.slow_start` seconds instead of taking a full share at once."""

from __future__ import annotations

import json
import time
from collections import Counter

from tests.rawhttp import get
from tests.flaky_backends import SwitchableServer


def share_of(port: int, name: str, n: int) -> float:
    seen = Counter()
    for _ in range(n):
        status, headers, _ = get(port, "/")
        assert status == 200
        seen[headers["X-Backend"]] += 1
    return seen[name] / n


def ramp_of(lb, name: str) -> tuple[str, float]:
    """The admin API's state and slow-start ramp for backend `name` (lowest over workers)."""
    status, _, body = get(lb.admin_port, "/api/backends")
    assert status == 200
    [b] = [b for b in json.loads(body)["backends"] if b["name"] == name]
    return b["state"], b["slow_start_ramp"]


def wait_state(lb, name: str, pred, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred(*ramp_of(lb, name)):
        assert time.monotonic() < deadline, ramp_of(lb, name)
        time.sleep(0.02)


def test_a_returning_backend_ramps_up(lb_factory):
    a, b, c = SwitchableServer("a"), SwitchableServer("b"), SwitchableServer("c", status=500)
    try:
        lb = lb_factory([a, b, c], strategy="round_robin", extra=(
            "[balancer]\nslow_start = 4.0\nseed = 3\n"
            "[outlier]\nconsecutive_failures = 2\nbase_ejection = 0.5\n"))
        for _ in range(9):
            get(lb.port, "/")
        lb.log.wait_for("backend_ejected")
        c.status = 200
        lb.log.wait_for("backend_returned", timeout=5)
        wait_state(lb, "c", lambda state, ramp: state != "ejected")  # the worker's report since
        state, ramp = ramp_of(lb, "c")
        assert state == "slow start" and ramp < 0.5, (state, ramp)
        # 60 requests take a fraction of the 4 s ramp: a small share.
        early = share_of(lb.port, "c", 60)
        assert early < 0.2, early  # full share would be 1/3
        # Once every worker has finished the ramp: a full share.
        wait_state(lb, "c", lambda state, ramp: (state, ramp) == ("up", 1.0))
        late = share_of(lb.port, "c", 60)
        assert late > 0.25, late
    finally:
        for s in (a, b, c):
            s.close()
