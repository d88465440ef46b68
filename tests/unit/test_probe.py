"""Capacity exploration (workers/probe.py): a campaign holds an unmeasured
backend at one request over its slot count until its curve shows the knee,
within a bounded share of the picks."""

from __future__ import annotations

import random

from lb.core.config import Backend as BackendConfig
from workers.backend import Backend
from workers.loadcurve import Curve, fit
from workers.probe import ANSWERS, CLIMB, EVERY, LOOK, RATIO, TOKENS, KneeProbe
from workers.strategies import make_strategy


def fleet(n: int) -> list[Backend]:
    bs = [Backend(BackendConfig(address=f"127.0.0.1:{9000 + i}", name=f"b{i}"), 1, i) for i in range(n)]
    for b in bs:
        b.curve = Curve(1)
        b.curve.service = [0.010]
    return bs


def test_a_campaign_climbs_from_one_request_over_the_slot_count():
    fast, slow = fleet(2)
    fast.curve.top = 3.0  # it queued at 2 in flight: its one slot is measured
    slow.curve.measured = 2.0  # fitted from answers at loads up to 1: a lower bound
    probe = KneeProbe(1.0)  # every pick may pay
    order, prices = [fast, slow], [0.010, 0.030]
    sent_at = []
    for _ in range(60):
        b = probe.steer(order, prices, 1.0)
        if b is slow:
            sent_at.append(slow.inflight)
            slow.inflight += 1
            if slow.inflight == probe.goal:  # its backend answers one, the next pick refills
                slow.inflight -= 1
    # it fills the two slots and holds one request over them, ANSWERS requests
    # at each load, then climbs one more at a time up to CLIMB over the count
    assert sent_at[:3] == [0, 1, 2]
    assert max(sent_at) == 2 + CLIMB - 1 and sent_at.count(max(sent_at)) == ANSWERS
    assert all(sent_at.count(load) >= ANSWERS for load in range(2, 2 + CLIMB))
    assert probe.target is None  # the campaign is over


def test_the_share_bounds_the_requests_campaigns_take():
    rng = random.Random(5)
    bs = fleet(4)
    order, prices = bs, [0.010, 0.012, 0.015, 0.020]
    probe = KneeProbe(0.01)
    steered = 0
    now = 0.0
    for i in range(50_000):
        now += 0.001
        b = probe.steer(order, prices, now)
        if b is not None:
            steered += 1
            b.inflight += 1
        for x in bs:  # each backend answers its requests soon
            if x.inflight and rng.random() < 0.3:
                x.inflight -= 1
    assert 0 < steered <= 0.01 * 50_000 + TOKENS


def test_no_campaign_on_a_measured_failing_or_dear_backend():
    knee, failing, dear = fleet(3)
    knee.curve.measured, knee.curve.top = 2.0, 4.0  # it queued at 3 in flight: measured
    failing.failures = 2
    order = [knee, failing, dear]
    prices = [0.010, 0.010, 0.010 * RATIO * 1.5]
    probe = KneeProbe(1.0)
    assert all(probe.steer(order, prices, float(t)) is None for t in range(50))


def test_each_backend_waits_its_turn():
    a, b = fleet(2)
    probe = KneeProbe(1.0)
    probe.tokens = TOKENS
    order, prices = [a, b], [0.010, 0.010]
    assert probe.steer(order, prices, 0.0) is a
    probe.target = None  # that campaign is over
    assert probe.steer(order, prices, 0.1) is None  # the next look waits LOOK seconds
    assert probe.steer(order, prices, LOOK) is b  # the other one, not a again
    probe.target = None
    assert probe.steer(order, prices, 3 * LOOK) is None  # both visited lately
    assert probe.steer(order, prices, EVERY) is a


def test_ml_measures_an_idle_backend_and_the_guard_does_not_judge_those_picks():
    """Two backends: ml keeps nearly everything on a fast one; with `probe_share`
    the slower one's curve sees it queue at three in flight (its two slots are
    measured), and the picks that did it carry no guard arm."""
    rng = random.Random(9)
    bs = [Backend(BackendConfig(address=f"127.0.0.1:{9100 + i}", name=f"b{i}"), 1, i) for i in range(2)]
    service, slots = [0.004, 0.012], [16, 2]
    st = make_strategy("ml", bs, decay=10.0, seed=3, guard_share=0.02, probe_share=0.05)
    now = 0.0
    st.clock = lambda: now
    inflight: list[tuple[float, Backend, int, float]] = []  # (answer at, backend, load sent at, latency)
    probe_arms = set()
    knee_seen = False
    for i in range(20_000):
        now += 0.002
        due = [r for r in inflight if r[0] <= now]
        inflight = [r for r in inflight if r[0] > now]
        for _, b, load, lat in due:
            b.inflight -= 1
            b.curve.learn(0, lat, load, now)
        if i % 50 == 0:
            st.check(now)
            fit(st._curves, 0.1)
            c = bs[1].curve
            knee_seen = knee_seen or c.top > c.measured + 0.5
        was = st.probe.target
        b = st.pick(cls=0)
        if st.probe.target is not None or was is not None:
            if b is bs[1] and b.inflight + 1 >= st.probe.goal:
                probe_arms.add(st.arm)
        load = b.inflight
        b.inflight += 1
        lat = service[b.idx] * max(1.0, (load + 1) / slots[b.idx]) * (0.9 + 0.2 * rng.random())
        inflight.append((now + lat, b, load, lat))
    assert knee_seen and bs[1].curve.measured == 2
    assert probe_arms == {-1}


def test_lb_capacity_says_how_to_measure_what_it_only_bounds():
    from lb.cli import format_capacity

    def view(explore):
        return {"fleet": {"load_rps": 10.0, "capacity_rps": 50.0, "headroom": 4.0, "recommended_backends": 1,
                          "routable_backends": 2, "known": False, "slo_p99_ms": 250.0, "explore": explore},
                "backends": {"b": {"capacity_rps": 20.0, "saturation_rps": 25.0, "slots": 1.0, "service_ms": 40.0,
                                   "known": False, "note": "not seen under enough load to know its limit"}},
                "forecast": [], "forecast_reason": "no history"}

    assert "capacity.explore = 0.01 would measure them" in format_capacity(view(0.0)).splitlines()[0]
    first = format_capacity(view(0.01)).splitlines()[0]
    assert "a lower bound" in first and "capacity.explore" not in first
