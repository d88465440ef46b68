"""kill -9 of one of three backends under GET load: no client error; active
health checks mark it down within fall x interval, and up again within
rise x interval once it is back, after which its share ramps up."""

from __future__ import annotations

import time

from tests.conftest import BackendProc
from tests.load import Load

HEALTH = """[health]
path = "/"
interval = 0.2
timeout = 0.2
rise = 2
fall = 2
[balancer]
slow_start = 2.0
"""


def wait_until(pred, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def applied(lb, event: str, workers: int, after: float) -> float:
    """When the last of the workers applied a health change for c (its own log line,
    written just before it routes by it).  Log times are rounded to the millisecond."""
    def every_worker():
        evs = [e for e in lb.log.events(event) if e["backend"] == "c" and e["ts"] >= after]
        return evs if len({e["slot"] for e in evs}) == workers else None

    return max(e["ts"] for e in wait_until(every_worker, f"{event} from {workers} workers")) + 0.001


def test_killed_backend_is_routed_around_marked_down_and_ramps_back(backend_factory, lb_factory):
    a, b, c = backend_factory("a"), backend_factory("b"), backend_factory("c")
    lb = lb_factory([a, b, c], strategy="round_robin", workers=2, extra=HEALTH)
    load = Load(lb.port)
    load.start()
    try:
        # Every backend serving before the kill.
        wait_until(lambda: all(sum(r[1] == n for r in list(load.results)) >= 10 for n in "abc"),
                   "traffic on every backend")
        t_kill = time.time()
        c.kill()
        down = lb.log.wait_for("health_change", timeout=5)[0]
        assert down["backend"] == "c" and down["up"] is False
        assert down["checks"] == 2  # down at the fall-th failed check (2 x interval)
        down_at = applied(lb, "backend_down", 2, t_kill)
        # The down window: requests that every worker has routed without c.
        wait_until(lambda: sum(t >= down_at for t, _ in list(load.results)) >= 50, "requests while c is down")
        c2 = BackendProc("c", port=c.port)
        try:
            up = lb.log.wait_for("health_change", count=2, timeout=5)[1]
            assert up["backend"] == "c" and up["up"] is True
            assert up["checks"] == 2  # up at the rise-th passed check (2 x interval)
            up_at = applied(lb, "backend_up", 2, down_at)
            # slow_start is 2 s: wait until the load has run well past the ramp.
            wait_until(lambda: sum(t >= up_at + 2.1 for t, _ in list(load.results)) >= 60,
                       "requests after the ramp")
        finally:
            load.stop.set()
            load.join(10)
            c2.kill()
    finally:
        load.stop.set()
    assert load.errors() == [], load.errors()[:5]
    assert load.share("c", down_at, up["ts"]) == 0.0  # down: no traffic
    early = load.share("c", up_at, up_at + 0.6)
    late = load.share("c", up_at + 2.1, float("inf"))
    assert early < late, (early, late)
    assert late > 0.25, late  # back to about a third
