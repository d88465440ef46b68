"""An `ml` strategy in memory, for unit tests of its pick: n backends that
have each answered once (5 ms, nothing else in flight), no table yet (the
worker's own rows), and a clock the test moves (`clock[0]`)."""

from __future__ import annotations

from lb.core.config import Backend as BackendConfig
from workers.backend import Backend
from workers.strategies import make_strategy


def ml_fleet(n: int, now: float, **strategy):
    """(strategy, backends, clock); `strategy`: make_strategy's keywords
    (exploration, guard_share, ...)."""
    k = len(strategy.get("class_names", ("default",)))
    bs = [Backend(BackendConfig(address=f"127.0.0.1:{9000 + i}", name=f"b{i}"), k, i) for i in range(n)]
    s = make_strategy("ml", bs, decay=10.0, seed=1, **strategy)
    clock = [now]
    s.clock = lambda: clock[0]
    for b in bs:
        b.record(0, 0.005, False, now, 0)
    s.check(now)
    return s, bs, clock
