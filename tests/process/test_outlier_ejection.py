"""Passive outlier detection: consecutive failures of real requests eject a
backend for a time that grows with repeated ejections; never more than
`max_ejected_percent` of the pool; panic mode when too few are left."""

from __future__ import annotations

import json
import time
from collections import Counter


from tests.rawhttp import get



def wait_metric(admin_port: int, line: str, timeout: float = 5.0) -> str:
    """The admin's /metrics once it contains `line` (stats arrive every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        text = get(admin_port, "/metrics")[2].decode()
        if line in text or time.monotonic() > deadline:
            assert line in text, text[-2000:]
            return text
        time.sleep(0.1)


def hits(port: int, n: int) -> Counter:
    seen = Counter()
    for _ in range(n):
        status, headers, _ = get(port, "/")
        seen[(headers.get("X-Backend", "lb"), status)] += 1
    return seen


OUTLIER = """[balancer]
slow_start = 0
[outlier]
consecutive_failures = 3
base_ejection = 1.0
max_ejection = 10.0
"""


def test_a_failing_backend_is_ejected_then_returns(servers, lb_factory):
    a, b, c = servers("a"), servers("b"), servers("c", status=500)
    lb = lb_factory([a, b, c], strategy="round_robin", extra=OUTLIER)
    seen = hits(lb.port, 30)
    assert seen[("c", 500)] == 3  # the third failure in a row ejects it
    assert seen[("a", 200)] + seen[("b", 200)] == 27
    ejected = lb.log.wait_for("backend_ejected")[0]
    assert ejected["backend"] == "c" and ejected["seconds"] == 1.0
    metrics = wait_metric(lb.admin_port, 'lb_backend_ejections_total{backend="c"} 1.0')
    assert 'lb_backend_unavailable_workers{backend="c"} 1.0' in metrics
    listing = {x["name"]: x for x in json.loads(get(lb.admin_port, "/api/backends")[2])["backends"]}
    assert listing["c"]["state"] == "ejected" and listing["c"]["ejections"] == 1
    assert listing["a"]["state"] == "up"
    c.status = 200
    lb.log.wait_for("backend_returned", timeout=5)
    seen = hits(lb.port, 30)
    assert seen[("c", 200)] == 10  # back in rotation at its full share


def test_repeated_ejections_last_longer(servers, lb_factory):
    a, c = servers("a"), servers("c", status=500)
    lb = lb_factory([a, c], strategy="round_robin",
                    extra=OUTLIER + "max_ejected_percent = 50\n")
    hits(lb.port, 8)
    first = lb.log.wait_for("backend_ejected")[0]
    lb.log.wait_for("backend_returned", timeout=5)
    hits(lb.port, 8)  # still failing: ejected again, for longer
    second = lb.log.wait_for("backend_ejected", count=2)[1]
    assert (first["seconds"], second["seconds"]) == (1.0, 2.0)
    assert second["streak"] == 2


def test_never_more_than_max_ejected_percent(servers, lb_factory):
    a, b = servers("a", status=500), servers("b", status=500)
    lb = lb_factory([a, b], strategy="round_robin", extra=OUTLIER)
    seen = hits(lb.port, 20)
    assert sum(n for (name, st), n in seen.items() if st == 500) == 20  # both still tried
    assert len(lb.log.events("backend_ejected")) == 1  # 50% of two backends
    skipped = lb.log.wait_for("ejection_skipped")
    assert skipped[0]["reason"] == "max_ejected_percent"


def test_panic_mode_routes_to_all_when_too_few_are_healthy(servers, lb_factory):
    a, b, c = servers("a"), servers("b", status=500), servers("c", status=500)
    lb = lb_factory([a, b, c], strategy="round_robin",
                    extra=OUTLIER + "max_ejected_percent = 100\n")
    hits(lb.port, 30)
    assert len(lb.log.wait_for("backend_ejected", count=2)) == 2
    panic = lb.log.wait_for("panic_mode")[0]
    assert panic["on"] is True and panic["healthy"] == 1 and panic["routable"] == 3
    # One healthy backend of three is below the 50% threshold: all three get traffic.
    seen = hits(lb.port, 30)
    assert {name for name, _ in seen} == {"a", "b", "c"}
