"""Load-balancing strategies: the pure-Python strategy objects directly, then
end to end through lb with real backends."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from lb.core.config import Backend as BackendConfig
from tests.servers import SlowServer, route
from tests.rawhttp import get
from workers import strategies as balancer
from workers.backend import Backend
from workers.strategies import make_strategy

ALL = ("round_robin", "weighted_round_robin", "least_connections", "random", "p2c_ewma", "prequal")


def mk(*spec: tuple[str, int]) -> list[Backend]:
    return [Backend(BackendConfig(address=f"127.0.0.1:{9000 + i}", name=n, weight=w))
            for i, (n, w) in enumerate(spec)]


def strat(name: str, backends: list[Backend], seed: int = 7, decay: float = 10.0):
    return make_strategy(name, backends, decay=decay, seed=seed)


def picks(s, n: int, exclude=()) -> list[str]:
    out = []
    for _ in range(n):
        b = s.pick(exclude)
        out.append(None if b is None else b.name)
    return out


def max_run(seq, item) -> int:
    best = cur = 0
    for x in seq:
        cur = cur + 1 if x == item else 0
        best = max(best, cur)
    return best


# -- unit: common behaviour ------------------------------------------------------------


def test_every_strategy_is_registered():
    for name in ALL:
        assert name in balancer.STRATEGIES
        assert balancer.STRATEGIES[name].name == name


@pytest.mark.parametrize("name", ALL)
def test_only_available_backends_are_picked(name):
    bs = mk(("a", 1), ("off", 0), ("c", 1))
    s = strat(name, bs)
    got = Counter(picks(s, 300))
    assert got["off"] == 0
    assert got["a"] > 0 and got["c"] > 0


@pytest.mark.parametrize("name", ALL)
def test_no_available_backend_gives_none(name):
    s = strat(name, mk(("a", 0), ("b", 0)))
    assert picks(s, 5) == [None] * 5


@pytest.mark.parametrize("name", ALL)
def test_exclude_is_respected(name):
    bs = mk(("a", 1), ("b", 1), ("c", 1))
    s = strat(name, bs)
    got = Counter(picks(s, 200, exclude=(bs[0],)))
    assert got["a"] == 0
    assert got["b"] > 0 and got["c"] > 0
    assert picks(s, 3, exclude=tuple(bs)) == [None] * 3


@pytest.mark.parametrize("name", ALL)
def test_single_backend_always_picked(name):
    s = strat(name, mk(("only", 3)))
    assert picks(s, 10) == ["only"] * 10


@pytest.mark.parametrize("name", ALL)
def test_backend_marked_unavailable_at_runtime_is_skipped(name):
    bs = mk(("a", 1), ("b", 1), ("c", 1))
    s = strat(name, bs)
    bs[1].available = False
    got = Counter(picks(s, 200, exclude=(bs[0],)))
    assert got == Counter({"c": 200})


# -- unit: round robin ------------------------------------------------------------------------


def test_round_robin_cycles_in_order():
    s = strat("round_robin", mk(("a", 1), ("b", 1), ("c", 1)))
    seq = picks(s, 9)
    assert Counter(seq) == Counter(a=3, b=3, c=3)
    # a strict cycle: each window of 3 holds every backend
    for i in range(7):
        assert len(set(seq[i:i + 3])) == 3


def test_round_robin_ignores_weights():
    s = strat("round_robin", mk(("a", 5), ("b", 1)))
    assert Counter(picks(s, 10)) == Counter(a=5, b=5)


# -- unit: smooth weighted round robin -------------------------------------------------------


def test_weighted_round_robin_is_smooth_like_nginx():
    s = strat("weighted_round_robin", mk(("a", 5), ("b", 1), ("c", 1)))
    seq = picks(s, 70)
    assert seq[:7] == ["a", "a", "b", "a", "c", "a", "a"]
    # every cycle of 7 holds exactly 5 a, 1 b, 1 c
    for i in range(0, 70, 7):
        assert Counter(seq[i:i + 7]) == Counter(a=5, b=1, c=1)
    # smooth: the heavy backend runs at most 4 in a row (2 at the end of one
    # cycle + 2 at the start of the next); a naive WRR gives runs of 5
    assert max_run(seq, "a") <= 4
    assert max_run(seq, "b") == 1 and max_run(seq, "c") == 1


def test_weighted_round_robin_proportions():
    s = strat("weighted_round_robin", mk(("a", 3), ("b", 2), ("c", 1)))
    assert Counter(picks(s, 600)) == Counter(a=300, b=200, c=100)


def test_weighted_round_robin_with_exclude_stays_proportional():
    bs = mk(("a", 5), ("b", 1), ("c", 1))
    s = strat("weighted_round_robin", bs)
    got = Counter(picks(s, 60, exclude=(bs[1],)))
    assert got == Counter(a=50, c=10)


# -- unit: least connections ------------------------------------------------------------------


def test_least_connections_picks_fewest_inflight():
    bs = mk(("a", 1), ("b", 1), ("c", 1))
    s = strat("least_connections", bs)
    bs[0].inflight, bs[1].inflight, bs[2].inflight = 3, 0, 1
    assert picks(s, 10) == ["b"] * 10
    bs[1].inflight = 5
    assert picks(s, 10) == ["c"] * 10


def test_least_connections_ties_rotate():
    s = strat("least_connections", mk(("a", 1), ("b", 1), ("c", 1)))
    assert Counter(picks(s, 30)) == Counter(a=10, b=10, c=10)


def test_least_connections_is_relative_to_weight():
    bs = mk(("big", 4), ("small", 1))
    s = strat("least_connections", bs)
    bs[0].inflight, bs[1].inflight = 2, 0  # (2+1)/4 = 0.75 < (0+1)/1 = 1
    assert picks(s, 5) == ["big"] * 5
    bs[0].inflight = 4  # (4+1)/4 = 1.25 > 1
    assert picks(s, 5) == ["small"] * 5


def test_least_connections_simulated_load_spreads_evenly():
    bs = mk(("a", 1), ("b", 1), ("c", 1))
    s = strat("least_connections", bs)
    for _ in range(9):  # nine concurrent requests, none finishes
        s.pick().inflight += 1
    assert [b.inflight for b in bs] == [3, 3, 3]


# -- unit: random -------------------------------------------------------------------------------


def test_random_uses_every_backend_evenly():
    s = strat("random", mk(("a", 1), ("b", 1), ("c", 1)), seed=11)
    got = Counter(picks(s, 3000))
    for n in "abc":
        assert 850 <= got[n] <= 1150, got


def test_random_is_proportional_to_weight():
    s = strat("random", mk(("a", 3), ("b", 1)), seed=5)
    got = Counter(picks(s, 4000))
    assert 2800 <= got["a"] <= 3200, got


def test_random_with_same_seed_is_reproducible():
    a = picks(strat("random", mk(("a", 1), ("b", 1), ("c", 1)), seed=42), 50)
    b = picks(strat("random", mk(("a", 1), ("b", 1), ("c", 1)), seed=42), 50)
    assert a == b


# -- unit: p2c + peak EWMA ------------------------------------------------------------------------


def test_peak_ewma_jumps_up_and_decays_slowly():
    bs = mk(("a", 1), ("b", 1))
    s = strat("p2c_ewma", bs, decay=10.0)
    a = bs[0]
    s.observe(a, 0.200, now=100.0)
    assert a.ewma == pytest.approx(0.200)  # a higher sample is taken at once
    s.observe(a, 0.010, now=101.0)  # one second later, a fast answer
    assert 0.010 < a.ewma < 0.200
    assert a.ewma > 0.150  # tau = 10 s: one second only moves it ~10 %
    first = a.ewma
    s.observe(a, 0.010, now=131.0)  # 30 s later: mostly forgotten
    assert a.ewma < first
    assert a.ewma < 0.030


def test_record_with_now_updates_the_peak_ewma_like_observe():
    # The data plane records a response head with one call; the EWMA it keeps
    # must be the strategy's (same decay, same peak rule).
    seen, recorded = mk(("a", 1), ("b", 1))
    s = strat("p2c_ewma", [seen, recorded], decay=5.0)
    samples = [(0.200, 100.0), (0.010, 101.0), (0.050, 103.5), (0.010, 140.0), (0.300, 140.1)]
    for rtt, now in samples:
        s.observe(seen, rtt, now)
        recorded.record(0, rtt, False, now)
        assert recorded.ewma == pytest.approx(seen.ewma, rel=1e-12)
        assert recorded.ewma_ts == seen.ewma_ts == now
    assert recorded.cls_responses == [len(samples)]
    assert seen.cls_responses == [0]  # observe alone counts nothing
    before = recorded.ewma
    recorded.record(0, 5.0, True)  # a failure without a head: no EWMA sample
    assert recorded.ewma == before and recorded.cls_errors == [1]


def test_a_fast_error_never_lowers_the_peak_ewma():
    # A backend answering 503 in 0.2 ms must not look fast: least-latency
    # policies would pour the traffic into its failures.
    failing, healthy = mk(("failing", 1), ("healthy", 1))
    for b in (failing, healthy):
        b.record(0, 0.005, False, 100.0)
    for i in range(20):
        failing.record(0, 0.0002, True, 100.1 + i * 0.1)
        healthy.record(0, 0.005, False, 100.1 + i * 0.1)
    assert failing.ewma == pytest.approx(0.005)
    assert failing.cls_errors == [20] and failing.ewma_ts == 100.0
    failing.record(0, 0.050, True, 103.0)  # a slow error still raises it
    assert failing.ewma == pytest.approx(0.050) and failing.ewma_ts == 103.0
    failing.record(0, 0.001, False, 104.0)  # a success lowers it as before
    assert 0.001 < failing.ewma < 0.050


def test_p2c_ewma_avoids_a_slow_backend():
    bs = mk(("fast1", 1), ("fast2", 1), ("slow", 1))
    s = strat("p2c_ewma", bs, seed=3)
    for b in bs:
        s.observe(b, 0.300 if b.name == "slow" else 0.002, now=1.0)
    got = Counter(picks(s, 500))
    # the slow backend loses every comparison
    assert got["slow"] == 0
    assert got["fast1"] > 150 and got["fast2"] > 150


def test_p2c_ewma_accounts_for_inflight():
    bs = mk(("a", 1), ("b", 1))
    s = strat("p2c_ewma", bs, seed=3)
    s.observe(bs[0], 0.010, now=1.0)
    s.observe(bs[1], 0.010, now=1.0)
    bs[0].inflight = 10  # same latency, but a is busy
    assert Counter(picks(s, 50)) == Counter(b=50)


def test_p2c_ewma_two_choices_spread_equal_backends():
    bs = mk(("a", 1), ("b", 1), ("c", 1), ("d", 1))
    s = strat("p2c_ewma", bs, seed=9)
    got = Counter()
    for _ in range(400):  # simulate: each pick stays in flight a little
        b = s.pick()
        got[b.name] += 1
        b.inflight += 1
        if sum(x.inflight for x in bs) > 8:
            for x in bs:
                x.inflight = max(0, x.inflight - 1)
    assert all(got[n] > 40 for n in "abcd"), got


def test_p2c_ewma_unavailable_backend_never_picked_even_when_fastest():
    bs = mk(("fast", 1), ("ok1", 1), ("ok2", 1))
    s = strat("p2c_ewma", bs, seed=1)
    s.observe(bs[0], 0.0001, now=1.0)
    s.observe(bs[1], 0.05, now=1.0)
    s.observe(bs[2], 0.05, now=1.0)
    bs[0].available = False
    got = Counter(picks(s, 300))
    assert got["fast"] == 0 and got["ok1"] > 0 and got["ok2"] > 0


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture
def three(backend_factory):
    return [backend_factory(n) for n in ("a", "b", "c")]


def test_e2e_round_robin(lb_factory, three):
    lb = lb_factory(three, strategy="round_robin")
    seq = route(lb.port, 30)
    assert Counter(seq) == Counter(a=10, b=10, c=10)
    assert all(len(set(seq[i:i + 3])) == 3 for i in range(28))


def test_e2e_weighted_round_robin_5_1_1(lb_factory, three):
    lines = "\n".join(
        f'[[backends]]\naddress = "{b.address}"\nname = "{b.name}"\nweight = {w}'
        for b, w in zip(three, (5, 1, 1))
    )
    lb = lb_factory(three, strategy="weighted_round_robin", backend_lines=lines)
    seq = route(lb.port, 70)
    assert Counter(seq) == Counter(a=50, b=10, c=10)
    assert max_run(seq, "a") <= 4, seq
    for i in range(0, 70, 7):
        assert Counter(seq[i:i + 7]) == Counter(a=5, b=1, c=1), seq


def test_e2e_least_connections_avoids_busy_backend(lb_factory, three):
    lb = lb_factory(three, strategy="least_connections")
    results = []

    def slow():
        results.append(get(lb.port, "/slow/2000", timeout=10))

    t = threading.Thread(target=slow)
    t.start()
    busy = None
    deadline = time.monotonic() + 3
    while busy is None and time.monotonic() < deadline:
        for b in three:
            if any(r["target"] == "/slow/2000" for r in b.requests()):
                busy = b.name
        time.sleep(0.02)
    assert busy is not None, "slow request never reached a backend"
    seq = route(lb.port, 8)  # finishes well before the slow one
    t.join(10)
    assert results and results[0][0] == 200
    assert busy not in seq, (busy, seq)
    assert len(set(seq)) == 2  # the two idle backends share the work


def test_e2e_random_reaches_every_backend(lb_factory, three):
    lb = lb_factory(three, strategy="random")
    got = Counter(route(lb.port, 200))
    assert set(got) == {"a", "b", "c"}
    assert all(v >= 30 for v in got.values()), got


def test_e2e_p2c_ewma_shuns_a_slow_backend(lb_factory, backend_factory):
    fast1, fast2 = backend_factory("fast1"), backend_factory("fast2")
    slow = SlowServer("slow", 0.3)
    try:
        lines = "\n".join(f'[[backends]]\naddress = "{a}"\nname = "{n}"' for n, a in
                          (("fast1", fast1.address), ("slow", slow.address), ("fast2", fast2.address)))
        lb = lb_factory([], strategy="p2c_ewma", backend_lines=lines)
        got = Counter(route(lb.port, 80))
    finally:
        slow.close()
    assert sum(got.values()) == 80
    # after its first 300 ms answer the slow backend loses every comparison
    assert got["slow"] <= 3, got
    # Sequential requests: a fast backend wins its pairing with the slow one, and
    # the two fast ones split by their EWMAs; each is in a third of the pairs at
    # least (binomial mean ~26 of 80), so 10 is far in the tail, 20 was not.
    assert got["fast1"] >= 10 and got["fast2"] >= 10, got
    assert slow.count == got["slow"]


def test_e2e_strategies_never_route_to_weight_zero(lb_factory, three):
    for strategy in ALL:
        lines = "\n".join(
            f'[[backends]]\naddress = "{b.address}"\nname = "{b.name}"\nweight = {w}'
            for b, w in zip(three, (1, 0, 1))
        )
        lb = lb_factory(three, strategy=strategy, backend_lines=lines)
        got = Counter(route(lb.port, 20))
        assert got["b"] == 0, (strategy, got)
        assert got["a"] + got["c"] == 20
        lb.stop()


def test_seed_zero_seeds_from_the_os():
    # make_strategy with seed 0 is not deterministic: three strategies differ.
    seqs = set()
    for _ in range(3):
        s = make_strategy("random", mk(*[(f"n{i}", 1) for i in range(10)]), decay=10.0, seed=0)
        seqs.add(tuple(picks(s, 20)))
    assert len(seqs) > 1


def test_every_strategy_answers_none_over_an_empty_fleet():
    """A fleet from etcd can be empty (every backend deleted): 503, never an exception."""
    from workers.strategies import STRATEGIES, make_strategy

    for name in STRATEGIES:
        s = make_strategy(name, [], decay=10.0, seed=1)
        assert s.pick((), 0) is None and s.pick((), 0) is None, name
