"""Where the strategies send requests to a backend that fails fast: ml's
exploration backs off from it, and P2C-EWMA does not let it win its pairs
for holding nothing in flight."""

from __future__ import annotations

from collections import Counter

from lb.core.config import Backend as BackendConfig
from workers.backend import Backend
from workers.strategies import make_strategy


def fleet(n: int) -> list[Backend]:
    return [Backend(BackendConfig(address=f"127.0.0.1:{9000 + i}", name=f"b{i}"), 1, i) for i in range(n)]


def test_exploration_waits_twice_as_long_after_each_failure():
    bs = fleet(3)
    st = make_strategy("ml", bs, decay=10.0, seed=1, exploration=1.0)
    now = 0.0
    st.clock = lambda: now
    healthy, failing = bs[1], bs[2]
    for b in bs:
        b.curve.seen = 0.0
    bs[0].curve.seen = 1e9  # heard from all along: never explored
    order = list(bs)
    sent: list[tuple[float, str]] = []
    while now < 40.0:
        now += 0.05
        b = st._stale(order)
        if b is None:
            continue
        sent.append((round(now, 2), b.name))
        if b is healthy:
            b.curve.seen = now  # it answered
        else:
            b.failures += 1  # a fast 503: nothing learned, one more failure in a row
    to_failing = [t for t, name in sent if name == failing.name]
    to_healthy = [t for t, name in sent if name == healthy.name]
    # the healthy backend is looked at again each time it has been quiet a second
    assert len(to_healthy) >= 30
    # the failing one after 1 s, then 2, 4, 8, 16 s more: five requests in 40 s, not forty
    gaps = [b - a for a, b in zip(to_failing, to_failing[1:])]
    assert len(to_failing) == 5
    assert [round(g) for g in gaps] == [2, 4, 8, 16]
    # one success ends the back-off
    failing.failures = 0
    now += 1.5
    assert st._stale([failing]) is failing


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
