"""The load curve (workers/loadcurve.py): service times and slot counts learned
from answers, the expected latency they give, and the bookkeeping of work in
flight.  Answers come from a k-server queue model with lognormal noise, as a
backend with k workers would give them."""

from __future__ import annotations

import heapq
import math
import random

import pytest

from lb.core.config import Backend as BackendConfig
from workers.backend import Backend
from workers.loadcurve import (DEFAULT_SERVICE, FIRST_ROUND, LEARN, MIN_FIT_ANSWERS, MIN_LEVEL_ANSWERS, SERVICE_CAP,
                               SLOT_GRID, Curve, fit)


def answers(curve: Curve, rng: random.Random, slots: int, service: tuple[float, ...], n: int,
            max_load: int, now: float) -> float:
    """`n` answers of a backend serving `slots` requests at once: a request sent
    while `load` others are in flight takes service x max(1, (load + 1) / slots),
    with lognormal noise.  The curve is refitted every 50 answers, as a worker
    does every stats tick.  Returns the clock after them."""
    for i in range(n):
        cls = rng.randrange(len(service))
        load = rng.randint(0, max_load)
        latency = service[cls] * max(1.0, (load + 1) / slots) * math.exp(rng.gauss(0.0, 0.2))
        now += 0.002
        curve.learn(cls, latency, load, now)
        if i % 50 == 49:
            fit([curve], 0.1)
    return now


@pytest.mark.parametrize("slots", [1, 2, 4, 8, 16, 32])
def test_slots_and_service_times_are_learned(slots):
    rng = random.Random(slots)
    curve = Curve(2)
    service = (0.004, 0.020)
    answers(curve, rng, slots, service, 4000, max_load=2 * slots + 2, now=0.0)
    assert curve.slots == slots
    for got, want in zip(curve.service, service):
        # the mean of the lognormal noise is exp(0.2^2 / 2) ~ 1.02
        assert want * 0.85 < got < want * 1.25, (curve.service, service)


def test_a_backend_never_seen_queueing_keeps_a_low_slot_count():
    """Answers at low loads only: the fit cannot tell 4 slots from 64, and takes the
    smallest count that explains them (no herd on a capacity it has not seen)."""
    rng = random.Random(7)
    curve = Curve(1)
    answers(curve, rng, 64, (0.005,), 2000, max_load=3, now=0.0)
    assert curve.slots == 4


def test_a_slowdown_moves_the_service_time_and_a_recovery_moves_it_back():
    rng = random.Random(3)
    curve = Curve(1)
    now = answers(curve, rng, 4, (0.005,), 1000, max_load=2, now=0.0)
    assert 0.004 < curve.service[0] < 0.006
    now = answers(curve, rng, 4, (0.025,), 100, max_load=2, now=now)
    assert curve.service[0] > 0.02
    answers(curve, rng, 4, (0.005,), 100, max_load=2, now=now)
    assert curve.service[0] < 0.0065


def test_a_backend_that_slows_down_while_busy_is_priced_up_within_a_few_answers():
    """Its answers all queued, so its service time learns nothing from them and
    the slot fit takes a second: `pace` carries the slowdown meanwhile, and
    goes back to 1 once answers meet the curve again."""
    rng = random.Random(5)
    curve = Curve(1)
    now = answers(curve, rng, 4, (0.005,), 1000, max_load=2, now=0.0)
    assert 1.0 <= curve.pace < 1.15
    calm = curve.expected(0, 5, 0.1, now)
    service = curve.service[0]
    for _ in range(8):  # 6x slower, every answer sent while 6 others were in flight
        now += 0.002
        curve.learn(0, 0.030 * 7 / 4 * math.exp(rng.gauss(0.0, 0.2)), 6, now)
    assert curve.service[0] == service  # (nothing it could learn from)
    assert curve.pace > 3.0
    curve.quiet_since = now
    assert curve.expected(0, 0, 0.1, now) > 3 * service
    assert curve.expected(0, 5, 0.1, now) > 3 * calm
    # fast again: twenty answers that meet the curve put pace back near 1 (its
    # noise), never below
    paces = []
    for _ in range(20):
        now += 0.002
        curve.learn(0, 0.005 * math.exp(rng.gauss(0.0, 0.2)), 0, now)
        paces.append(curve.pace)
    assert min(paces) >= 1.0 and curve.pace < 1.2
    assert curve.expected(0, 0, 0.1, now) == curve.service[0] * curve.pace


def test_expected_latency():
    curve = Curve(2)
    curve.service = [0.004, 0.020]
    curve.slots = 2.0
    now = 10.0
    curve.quiet_since = now
    # a free slot: the service time of the class; an unknown class: the price given
    assert curve.expected(0, 0, 0.1, now) == 0.004
    assert curve.expected(1, 1, 0.1, now) == 0.020
    curve.service[1] = 0.0
    assert curve.expected(1, 0, 0.1, now) == 0.1
    curve.service[1] = 0.020
    # a free slot, but the backend has gone 50 ms without answering its one request
    # in flight: it is priced at that silence (a slowdown shows before its answers)
    assert curve.expected(0, 1, 0.1, now + 0.05) == pytest.approx(0.05)
    # every slot taken: wait for (n + 1 - slots) / slots of the work in flight per request
    curve.work = 0.004 + 0.020 + 0.020 + 0.004  # four in flight
    assert curve.expected(0, 4, 0.1, now) == pytest.approx(0.004 + 3 / 2 * 0.048 / 4)
    # ... or at least as long as the backend has gone without answering
    assert curve.expected(0, 4, 0.1, now + 0.5) == pytest.approx(0.004 + 0.5)


def test_work_in_flight_is_given_back():
    curve = Curve(2)
    curve.service = [0.004, 0.0]
    works = [curve.start(0, 0, 1.0)[0], curve.start(1, 1, 1.0)[0], curve.start(0, 2, 1.0)[0]]
    # an unknown class counts as the dearest known one
    assert works == [0.004, 0.004, 0.004]
    assert curve.quiet_since == 1.0  # the busy period began with the first
    assert curve.flying == [2, 1]
    curve.done(0, works[0], 2)
    curve.done(1, works[1], 1)
    assert curve.work == pytest.approx(0.004) and curve.flying == [1, 0]
    curve.done(0, works[2], 0)
    assert curve.work == 0.0 and curve.flying == [0, 0]  # nothing in flight: no rounding left over
    fresh = Curve(1)
    assert fresh.start(0, 0, 0.0) == (DEFAULT_SERVICE, 1.0)


def test_start_says_how_heavy_the_requests_in_flight_are():
    """`mix`: the mean service of the requests in flight, by their classes at the
    curve's current service times, over the new one's."""
    curve = Curve(2)
    curve.service = [0.004, 0.012]
    assert curve.start(0, 0, 1.0) == (0.004, 1.0)  # nothing in flight
    s, mix = curve.start(1, 1, 1.0)
    assert s == 0.012 and mix == pytest.approx(0.004 / 0.012)
    s, mix = curve.start(0, 2, 1.0)
    assert s == 0.004 and mix == pytest.approx((0.016 / 2) / 0.004)
    # the service times move (a backend slowing down): the mix is of classes,
    # at today's times, not of what the requests were booked at
    curve.service = [0.040, 0.120]
    s, mix = curve.start(0, 3, 1.0)
    assert mix == pytest.approx((2 * 0.040 + 0.120) / 3 / 0.040)
    one = Curve(1)
    one.service = [0.004]
    one.start(0, 0, 1.0)
    one.service = [0.040]
    assert one.start(0, 1, 1.0) == (0.040, 1.0)  # one class: no mix, however the time moved


def fifo(curve: Curve, rng: random.Random, slots: int, service: tuple[float, float], light: float,
         rate: float, n: int) -> None:
    """`n` Poisson arrivals at `rate` to a first-come-first-served backend with
    `slots` servers; a `light` share of them is of class 0.  Each answer is
    learned when the next arrival finds it done, with the load and the mix its
    request was sent at; the curve is refitted every 50 arrivals."""
    free_at = [0.0] * slots  # when each server is next free (a heap)
    pending: list = []  # (finish, class, latency, load, mix, work) of the requests in the system
    now = 0.0
    for i in range(n):
        now += rng.expovariate(rate)
        while pending and pending[0][0] <= now:
            finish, cls, latency, load, mix, work = heapq.heappop(pending)
            curve.done(cls, work, len(pending))
            curve.learn(cls, latency, load, finish, None, mix)
        cls = 0 if rng.random() < light else 1
        took = service[cls] * math.exp(rng.gauss(0.0, 0.2))
        begin = max(now, heapq.heappop(free_at))
        heapq.heappush(free_at, begin + took)
        work, mix = curve.start(cls, len(pending), now)
        heapq.heappush(pending, (begin + took, cls, begin + took - now, len(pending), mix, work))
        if i % 50 == 49:
            fit([curve], 0.1)


@pytest.mark.parametrize("slots", [4, 8, 16])
def test_slots_are_read_through_a_queue_of_other_classes(slots):
    """A backend near its capacity, mostly light requests with heavy ones among
    them: a light request that queues waits for the heavy work ahead of it, ten
    times its own service.  Taken as if the queue were of its own class, that
    reads as half the backend's real slot count (the pick then keeps off a
    backend whose slots idle); with the mix the fit finds the real count."""
    curve = Curve(2)
    service = (0.002, 0.020)
    mean = 0.8 * service[0] + 0.2 * service[1]
    fifo(curve, random.Random(slots), slots, service, 0.8, 0.97 * slots / mean, 6000)
    assert slots <= curve.slots <= 1.3 * slots


@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("light", [1.0, 0.6])
def test_a_few_slots_are_read_exactly_through_the_rest_of_a_service(slots, light):
    """Poisson arrivals to a first-come-first-served backend with a few slots,
    at 70% and 90% of its capacity: a request that finds every slot taken
    waits for the rest of a service in progress, about half of one, not a
    whole one.  Counted whole, one slot read as 1.5, two as 2.5 and three as
    4 in about half these runs (the pick then sent a request to a busy
    backend as to a free half slot)."""
    service = (0.004, 0.020)
    mean = light * service[0] + (1 - light) * service[1]
    for seed in range(3):
        for load in (0.7, 0.9):
            curve = Curve(2)
            fifo(curve, random.Random(seed), slots, service, light, load * slots / mean, 6000)
            assert curve.slots == slots, (seed, load)


def test_the_first_answer_is_taken_whole():
    """A first answer that queued is not divided by a slot count nobody knows yet:
    a service time too low would draw the class's requests there."""
    curve = Curve(1)
    curve.learn(0, 0.030, 5, 1.0)
    assert curve.service == [0.030]


def test_an_answer_that_must_have_queued_moves_the_service_time_by_a_capped_step():
    """A request sent to what the slot count says is a free slot, answered
    far slower than the service time, most likely queued (a count read too
    high): it counts as SERVICE_CAP times the estimate, not whole.  Faster
    answers and the first one count whole."""
    curve = Curve(2)
    curve.learn(0, 0.002, 0, 1.0)
    curve.slots = 4.0
    curve.learn(0, 0.080, 2, 1.1)  # queued behind heavy requests
    assert curve.service[0] == pytest.approx(0.002 + LEARN * (SERVICE_CAP - 1) * 0.002)
    before = curve.service[0]
    curve.learn(0, 0.001, 1, 1.2)
    assert curve.service[0] == pytest.approx(before + LEARN * (0.001 - before))
    curve.learn(1, 0.500, 3, 1.3)  # a first answer
    assert curve.service[1] == 0.500
    # a backend that really slowed: the service time follows step by step, and the
    # pace carries the rest at once
    for i in range(3):
        curve.learn(0, 0.020, 0, 2.0 + i * 0.01)
    assert curve.service[0] < 0.004 and curve.expected(0, 0, 0.0, 2.1) > 0.010
    for i in range(80):
        curve.learn(0, 0.020, 0, 3.0 + i * 0.01)
    assert curve.service[0] == pytest.approx(0.020, rel=0.05)


def test_failures_teach_the_curve_nothing():
    b = Backend(BackendConfig(address="127.0.0.1:9", name="b"), 1, 0)
    b.curve = Curve(1)
    b.record(0, 0.0002, True, 1.0, 0)  # a fast 503: no service time (but it is news)
    assert b.curve.service == [0.0] and b.curve.seen == 1.0
    b.record(0, 0.005, False, 2.0, 0)
    assert b.curve.service == [0.005] and b.curve.seen == 2.0
    b.record(0, 0.005, False, 3.0)  # load unknown (-1): not learned
    assert b.curve.seen == 2.0


def test_only_ml_keeps_load_curves():
    from workers.strategies import make_strategy

    bs = [Backend(BackendConfig(address=f"127.0.0.1:{9000 + i}", name=f"b{i}"), 2, i) for i in range(3)]
    make_strategy("ml", bs, decay=10.0, seed=1, class_names=("default", "heavy"))
    assert all(isinstance(b.curve, Curve) and len(b.curve.service) == 2 for b in bs)
    make_strategy("p2c_ewma", bs, decay=10.0, seed=1)  # a pinned strategy replaces ml
    assert all(b.curve is None for b in bs)


def test_the_fit_keeps_the_evidence_the_stats_report():
    # The stats report each curve's evidence as of its last fit (`top`, computed
    # with the fit for every curve at once): the same as evidence() just before it.
    rng = random.Random(7)
    curves = [Curve(1) for _ in range(5)]
    for k, c in enumerate(curves):
        for _ in range(40 * k):
            c.learn(0, 0.004 * math.exp(rng.gauss(0.0, 0.2)), rng.randint(0, 3 * k), 1.0)
    before = [c.evidence() for c in curves]
    fit(curves, 0.1)
    assert [c.top for c in curves] == pytest.approx(before)
    assert before[0] == 0.0 and before[-1] > 1.0


def reference_fit(curve: Curve) -> tuple[float, float]:
    """The slot fit of one curve, written plainly: (the grid count of least
    squared log error over the levels with MIN_LEVEL_ANSWERS or more answers,
    weighted by answers; that least error)."""
    errors = [reference_error(curve, k) for k in SLOT_GRID.tolist()]
    best = min(errors)
    return SLOT_GRID[errors.index(best)].item(), best


def reference_error(curve: Curve, k: float) -> float:
    """The fit's error at `k` slots: at each level's mean in-flight count n and
    mix, the model 1 + rounds / k x mix, where the request waits
    FIRST_ROUND of a service for the one in service ahead of it and a whole
    one for each further request ahead."""
    err = 0.0
    for n, total, load, mix in zip(curve.level_n, curve.level_sum, curve.level_load, curve.level_mix):
        if n >= MIN_LEVEL_ANSWERS:
            ahead = max(0.0, load / n + 1.0 - k)
            rounds = ahead * FIRST_ROUND if ahead <= 1.0 else ahead - 1.0 + FIRST_ROUND
            err += n * (math.log(total / n) - math.log1p(rounds / k * (mix / n))) ** 2
    return err


def test_the_vectorised_fit_is_the_plain_one():
    """`fit` computes every curve at once over only the levels that count:
    the same counts as the plain rule, for curves whose levels are empty,
    under the answers that count, or full, in any mix."""
    rng = random.Random(5)
    checked = same = 0
    for _ in range(200):
        curves = [Curve(2) for _ in range(rng.randint(1, 40))]
        for c in curves:
            for lvl in range(len(c.level_n)):
                if rng.random() < 0.4:
                    n = rng.choice((0.5, 1.99, 2.0, rng.uniform(2.0, 60.0)))
                    c.level_n[lvl] = n
                    c.level_sum[lvl] = n * rng.uniform(0.8, 6.0)
                    c.level_load[lvl] = n * rng.uniform(0.0, 70.0)
                    c.level_mix[lvl] = n * rng.uniform(0.3, 3.0)
        want = [reference_fit(c) for c in curves]
        fit(curves, 0.0)  # (dt = 0: the levels stay as they were)
        for c, (slots, least) in zip(curves, want):
            if sum(n for n in c.level_n if n >= MIN_LEVEL_ANSWERS) >= MIN_FIT_ANSWERS:
                # the plain rule's count, or one that fits as well to the last few bits
                assert c.slots == slots or reference_error(c, c.slots) <= least * (1 + 1e-12), (c.slots, slots)
                same += c.slots == slots
                checked += 1
            else:
                assert c.slots == 1.0  # (the prior: too few answers to fit)
    assert checked > 1000 and same >= 0.99 * checked


def test_a_measured_slot_count_outlives_its_evidence():
    """A backend seen queueing at 4 keeps 4 as its measured count once it goes
    quiet: answers at low loads alone fit every count above them equally well.
    The pick's count falls back to the prior instead (no herd on a backend
    whose knee nobody has seen lately)."""
    rng = random.Random(11)
    curve = Curve(1)
    now = answers(curve, rng, 4, (0.005,), 2000, max_load=10, now=0.0)
    assert curve.slots == curve.measured == 4
    for _ in range(100):  # ten seconds of single requests: the knee's evidence decays away
        now += 0.1
        curve.learn(0, 0.005 * math.exp(rng.gauss(0.0, 0.2)), 0, now)
        fit([curve], 0.1)
    assert curve.top < 2.0  # only the lowest level has answers left ...
    assert curve.measured == 4  # ... and the count they cannot contradict stays measured
    assert curve.slots == 1  # while the pick's count is the prior again
    # answers that contradict it move it: the backend now queues from the second request on
    answers(curve, rng, 1, (0.005,), 1000, max_load=3, now=now)
    assert curve.measured == curve.slots == 1


def test_the_log_statistics_read_through_answers_that_queued_elsewhere():
    """An instance curve (the admin's, for capacity; a worker's keeps no log statistics):
    answers sent to a free slot, a share of which queued behind another
    worker's requests (up to two service times more): the spread of the log is
    the service's own when none queued, and the robust mean reads less high
    than the plain average when some did (averaged over several curves: one
    curve's estimates move with its last twenty answers)."""
    def learn(seed: int, queued: float) -> Curve:
        rng = random.Random(seed)
        curve = Curve(1, instance=True)
        for i in range(5000):
            latency = 0.020 * math.exp(rng.gauss(0.0, 0.3))
            if rng.random() < queued:
                latency += 0.040 * rng.random()
            curve.learn(0, latency, 0, i * 0.01)
        return curve

    true_mean = 0.020 * math.exp(0.3 ** 2 / 2)
    clean = [learn(seed, 0.0) for seed in range(8)]
    assert 0.25 < sum(c.spread() for c in clean) / 8 < 0.33
    robust = sum(math.exp(c.log_service[0] + c.spread() ** 2 / 2) for c in clean) / 8
    assert abs(robust / true_mean - 1) < 0.05
    for queued in (0.1, 0.25):
        curves = [learn(seed, queued) for seed in range(8)]
        robust = sum(math.exp(c.log_service[0] + c.spread() ** 2 / 2) for c in curves) / 8
        plain = sum(c.service[0] for c in curves) / 8
        assert robust < plain, (queued, robust, plain)
    assert Curve(1, instance=True).spread() == 0.0
    plain_curve = Curve(1)  # a worker's: the log statistics are not kept
    for i in range(50):
        plain_curve.learn(0, 0.020 * (1.5 if i % 2 else 1.0), 0, i * 0.01)
    assert plain_curve.spread() == 0.0
    zero = Curve(1, instance=True)  # a latency of zero (a clock that did not move) is learned, not a math error
    for _ in range(3):
        zero.learn(0, 0.0, 0, 1.0)
    assert math.isfinite(zero.log_service[0]) and math.isfinite(zero.spread())
