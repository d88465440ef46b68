"""Slow start: a backend back from an ejection ramps up its share over
`balancer.slow_start` seconds instead of taking a full share at once."""

from __future__ import annotations

import time
from collections import Counter

from tests.conftest import get
from tests.flaky_backends import SwitchableServer


def share_of(port: int, name: str, n: int) -> float:
    seen = Counter()
    for _ in range(n):
        status, headers, _ = get(port, "/")
        assert status == 200
        seen[headers["X-Backend"]] += 1
    return seen[name] / n


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
        back = lb.log.wait_for("backend_returned", timeout=5)[0]
        early = share_of(lb.port, "c", 60)  # within about a second of returning
        t_early = time.time() - back["ts"]
        time.sleep(max(0.0, 4.5 - (time.time() - back["ts"])))
        late = share_of(lb.port, "c", 60)
        assert t_early < 3.0, t_early
        assert early < 0.2, early  # full share would be 1/3
        assert late > 0.25, late
    finally:
        for s in (a, b, c):
            s.close()
