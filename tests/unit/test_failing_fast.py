"""A backend that fails fast: P2C-EWMA does not let it win its pairs for
holding nothing in flight."""

from __future__ import annotations

from collections import Counter

from lb.core.config import Backend as BackendConfig
from workers.backend import Backend
from workers.strategies import make_strategy


def fleet(n: int) -> list[Backend]:
    return [Backend(BackendConfig(address=f"127.0.0.1:{9000 + i}", name=f"b{i}"), 1, i) for i in range(n)]


def test_p2c_ewma_does_not_pour_requests_into_a_backend_failing_fast():
    bs = fleet(4)
    st = make_strategy("p2c_ewma", bs, decay=10.0, seed=2)
    for b in bs:
        b.record(0, 0.005, False, 1.0)
    failing = bs[3]
    failing.eject_after = 1 << 62  # no ejection: the pick alone decides
    hits = Counter()
    for i in range(4000):
        for b in bs[:3]:
            b.inflight = 1 + i % 2  # the healthy ones always have work in flight
        b = st.pick()
        hits[b.name] += 1
        if b is failing:
            b.record(0, 0.0002, i % 10 != 0, 1.0 + i * 0.001)  # 503 in 0.2 ms, nine times in ten
    # without the failures in its cost it holds nothing in flight and wins every pair it is in (~50%)
    assert hits[failing.name] < 0.15 * 4000
