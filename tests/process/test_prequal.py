"""The prequal strategy: the hot-cold lexicographic rule on the worker's own
in-flight counts and latency estimates, then end to end through lb."""

from __future__ import annotations

from collections import Counter

from lb.core.config import Backend as BackendConfig
from workers import prequal
from workers.backend import Backend
from workers.strategies import make_strategy


def fleet(n: int, weight: int = 1) -> list[Backend]:
    return [Backend(BackendConfig(address=f"127.0.0.1:{9000 + i}", name=f"b{i}", weight=weight), idx=i)
            for i in range(n)]


def test_cold_backend_with_lowest_latency_wins():
    bs = fleet(4)
    for b, ms in zip(bs, (8, 2, 5, 9)):
        b.ewma = ms / 1e3
    s = make_strategy("prequal", bs, decay=10.0, seed=1)
    # nothing in flight anywhere: every backend is cold, the fastest one wins each time
    assert Counter(s.pick().name for _ in range(50)) == {"b1": 50}


def test_hot_backend_is_passed_over_for_a_slower_cold_one():
    bs = fleet(5)
    for b, ms in zip(bs, (1, 4, 6, 8, 10)):
        b.ewma = ms / 1e3
    s = make_strategy("prequal", bs, decay=10.0, seed=1)
    # build a RIF history where 1 is the top of the distribution
    for _ in range(prequal.WINDOW // len(bs) + 1):
        s.pick()
    bs[0].inflight = 50  # far above every RIF seen: hot
    s._until = 0  # recompute the threshold at the next pick
    got = s.pick()
    assert s.hot_rif < 50
    assert got is bs[1], "the fastest cold backend, not the hot fastest one"


def test_all_hot_picks_fewest_in_flight():
    bs = fleet(3)
    for b, (ms, rif) in zip(bs, ((1, 30), (2, 20), (3, 25))):
        b.ewma = ms / 1e3
        b.inflight = rif
    s = make_strategy("prequal", bs, decay=10.0, seed=1)
    s.hot_rif = 5.0  # every candidate is above the recent quantile
    s._until = 10**9  # keep it there for this pick
    assert s.pick() is bs[1]


def test_weight_scales_requests_in_flight():
    bs = fleet(2)
    bs[0].weight = 4
    for b in bs:
        b.ewma = 0.005
        b.inflight = 8
    s = make_strategy("prequal", bs, decay=10.0, seed=1)
    s.hot_rif = 3.0  # 8/4 = 2 is cold, 8/1 = 8 is hot
    s._until = 10**9
    assert Counter(s.pick().name for _ in range(20)) == {"b0": 20}


def test_equal_backends_take_turns():
    bs = fleet(4)
    s = make_strategy("prequal", bs, decay=10.0, seed=1)
    got = Counter(s.pick().name for _ in range(400))
    assert set(got) == {"b0", "b1", "b2", "b3"} and min(got.values()) == 100


def test_large_fleet_reads_a_bounded_pool():
    bs = fleet(200)
    for i, b in enumerate(bs):
        b.ewma = (1 + i) / 1e3
    s = make_strategy("prequal", bs, decay=10.0, seed=3)
    seen = [s._candidates(()) for _ in range(50)]
    assert all(len(c) == prequal.POOL for c in seen)
    got = Counter(s.pick().name for _ in range(2000))
    # each pick is the fastest of a random 16: spread over the fast end, never the slow half
    assert len(got) > 5
    assert all(int(name[1:]) < 100 for name in got)


def test_exclude_and_unavailable():
    bs = fleet(3)
    bs[0].available = False
    s = make_strategy("prequal", bs, decay=10.0, seed=1)
    assert {s.pick(exclude=(bs[1],)).name for _ in range(20)} == {"b2"}
    assert s.pick(exclude=(bs[1], bs[2])) is None


def test_e2e_prequal_shuns_a_slow_backend(lb_factory, backend_factory):
    from tests.servers import SlowServer, route

    fast1, fast2 = backend_factory("fast1"), backend_factory("fast2")
    slow = SlowServer("slow", 0.3)
    try:
        lines = "\n".join(f'[[backends]]\naddress = "{a}"\nname = "{n}"' for n, a in
                          (("slow", slow.address), ("fast1", fast1.address), ("fast2", fast2.address)))
        lb = lb_factory([], strategy="prequal", backend_lines=lines)
        got = Counter(route(lb.port, 60))
    finally:
        slow.close()
    assert sum(got.values()) == 60
    # one request at a time: nothing is hot, so the lowest latency estimate wins;
    # the slow backend is tried at most once (before its first answer all are equal)
    assert got["slow"] <= 1, got
    assert slow.count == got["slow"]
