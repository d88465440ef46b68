"""The admin's instance-wide load curves (lb/admin/loadcurves.py): every
worker's answers put together give the backend's own slot count and service
time, which no single worker's share can."""

from __future__ import annotations

import heapq
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from lb.admin.loadcurves import FIT_SAMPLE, InstanceCurves
from lb.core.messages import BackendStats, WorkerStats


def _queue(slots: int, median: float, sigma: float, rate: float, seconds: float, seed: int,
           even: bool = False, transit: float = 0.0):
    """Requests of a FIFO `slots`-server queue with Poisson arrivals (or
    evenly spaced ones) and lognormal service: [(sent at, seconds to the
    answer)], as lb sees them when a request takes `transit` seconds to reach
    the backend and its answer as long again to be read."""
    rng = random.Random(seed)
    free = [0.0] * slots  # when each server frees up
    out, t = [], 0.0
    while True:
        t += 1.0 / rate if even else rng.expovariate(rate)
        if t >= seconds:
            return out
        start = max(t, heapq.heappop(free))
        done = start + median * math.exp(rng.gauss(0.0, sigma))
        heapq.heappush(free, done)
        out.append((t - transit, done - t + 2 * transit))


def _report(name: str, records, *, cls=0, lost=False, classes=("default",), generation=1) -> WorkerStats:
    b = BackendStats(name, 1, len(records), [0] * 6, 0, 0, 0, 0, 0, 0, 0.0, [len(records)], [0], [0.0], [[0]])
    b.sends = np.array([(cls, t0, took) for t0, took in records], dtype=np.float64).tobytes()
    b.sends_lost = lost
    return WorkerStats(slot=0, pid=1, generation=generation, seq=1, ts=0.0, classes=list(classes), backends=[b],
                       connections=0, accepted=0, requests=0, rejected=0, timeouts=0, no_backend=0)


def _run(requests, workers: int = 2, step: float = 0.1, fold_every: float = 1.0, seed: int = 0,
         lost_until: float = -1.0, **kw):
    """Replay `requests` as `workers` workers would report them (each answer in
    the report after its head arrived, the workers taking requests at
    random), folding once a `fold_every` seconds."""
    rng = random.Random(seed)
    owner = [rng.randrange(workers) for _ in requests]
    curves = InstanceCurves()
    end = max(t0 + took for t0, took in requests) + 3.0
    by_report: dict[tuple[int, int], list] = {}
    for w, (t0, took) in zip(owner, requests):
        by_report.setdefault((w, math.ceil((t0 + took) / step)), []).append((t0, took))
    t, next_fold = 0.0, fold_every
    for i in range(1, math.ceil(end / step) + 1):
        t = i * step
        for w in range(workers):
            got = by_report.get((w, i))
            if got:
                curves.offer(_report("b", got, lost=t <= lost_until, **kw), now=t)
        if t >= next_fold:
            curves.fold(t)
            next_fold += fold_every
    return curves


@pytest.mark.parametrize("slots,median,rate", [(1, 0.020, 35.0), (3, 0.030, 75.0)])
def test_two_workers_answers_give_the_backends_slots_and_service(slots, median, rate):
    """Shared by two workers at about 70% of its throughput, a backend of 1 (or 3)
    slots is read as 1 (or 3), not as the 1.5-2 of a worker's share, and its
    mean service within 10%, not inflated by the other worker's queueing."""
    sigma = 0.3
    curves = _run(_queue(slots, median, sigma, rate, 60.0, seed=slots))
    k, service, spread, top = curves.summary("b")
    assert k == slots
    assert service[0] == pytest.approx(median * math.exp(sigma * sigma / 2), rel=0.10)
    assert spread == pytest.approx(sigma, rel=0.25)
    assert "b" in curves.knee_at  # its answers showed it queue: the count is measured


@pytest.mark.parametrize("slots,rate,even,transit", [(1, 32.0, True, 0.004), (2, 64.0, True, 0.002),
                                                    (3, 96.0, False, 0.004)])
def test_arrivals_of_any_kind_and_late_reads_do_not_raise_the_slot_count(slots, rate, even, transit):
    """Requests evenly spaced (a request seldom finds the one ahead just
    begun, which the mean residual service assumes) or at random, and lb
    sending each a few milliseconds before the backend reads it and reading
    the answer as late (a busy host's event loops), at about 80% of the
    backend's throughput: the count is the backend's, and the lag is found.
    A fit that priced the queueing behind a request in progress at its mean
    residual service read the first two as one slot more."""
    curves = _run(_queue(slots, 0.025, 0.3, rate, 60.0, seed=slots, even=even, transit=transit))
    assert curves.summary("b")[0] == slots
    assert "b" in curves.knee_at
    assert curves.lag_of["b"] == pytest.approx(2 * transit, abs=0.0021)


def test_a_busy_backend_is_fitted_from_a_sample_of_its_answers():
    """1,300 answers a second from a backend of eight slots: the fit replays a
    sample of them each second (FIT_SAMPLE) and still reads eight."""
    curves = _run(_queue(8, 0.005, 0.3, 1300.0, 30.0, seed=8))
    assert 1300 > 2 * FIT_SAMPLE  # (per second: most answers are not replayed)
    k, service, _, _ = curves.summary("b")
    assert k == 8 and "b" in curves.knee_at
    assert service[0] == pytest.approx(0.005 * math.exp(0.3 ** 2 / 2), rel=0.15)


def test_a_backend_never_loaded_past_one_request_keeps_its_count_a_lower_bound():
    """One request at a time: nothing shows where it queues.  The count stays
    the prior and the knee is never seen (the capacity says `known: false`)."""
    one_at_a_time = [(i * 0.05, 0.02) for i in range(600)]
    curves = _run(one_at_a_time)
    k, service, _, top = curves.summary("b")
    assert k == 1.0 and top <= k + 0.5 and "b" not in curves.knee_at
    assert service[0] == pytest.approx(0.02, rel=0.01)


def test_5xx_answers_count_in_flight_but_teach_no_service():
    curves = _run([(i * 0.01, 0.001) for i in range(300)], cls=-1)  # -1 - class 0: a 5xx
    assert curves.summary("b") is None


def test_an_interval_with_answers_left_out_teaches_nothing():
    """A report that could not keep every answer (`sends_lost`) makes the
    in-flight counts around it unknown: that backend learns nothing then,
    and learns again from the requests sent well after it."""
    requests = _queue(2, 0.02, 0.3, 60.0, 10.0, seed=3)
    assert _run(requests, lost_until=20.0).summary("b") is None
    assert _run(requests).summary("b") is not None
    early = _run(requests, lost_until=1.0)  # the first second's reports: learning starts some seconds later
    full = _run(requests)
    assert early.summary("b") is not None
    assert 0 < sum(early.curves["b"].level_n) < sum(full.curves["b"].level_n)


def test_in_flight_counts_every_workers_requests_at_each_send():
    """Hand-made: requests overlapping by known amounts, from two workers; the
    level each answer is learned at is the number in flight when it was sent."""
    curves = InstanceCurves(lag=0.5)
    # worker 1: [0, 1.0) and [0.2, 0.5); worker 2: [0.1, 0.4) and [0.45, 0.6)
    curves.offer(_report("b", [(0.0, 1.0), (0.2, 0.3)]))
    curves.offer(_report("b", [(0.1, 0.3), (0.45, 0.15)]))
    curves.fold(0.4)  # horizon -0.1: nothing sent yet is learned
    assert curves.summary("b") is None
    curves.fold(2.0)  # horizon 1.5: all four
    c = curves.curves["b"]
    # sent at 0.0 with none in flight (the first answer: taken whole), at 0.1
    # with 1, at 0.2 with 2, at 0.45 with 2 ([0, 1.0) and [0.2, 0.5))
    loads = {round(load / n) for n, load in zip(c.level_n, c.level_load) if n > 0}
    assert loads == {1, 2}
    assert sum(n for n in c.level_n) > 0


def test_a_new_set_of_classes_starts_the_curves_over():
    """A reload that changes the classes: the new generation's workers start
    the curves over, and the old generation's, still draining, are not mixed
    in (their class numbers mean other classes)."""
    curves = _run(_queue(2, 0.02, 0.3, 60.0, 10.0, seed=4))
    assert curves.summary("b") is not None
    curves.offer(_report("b", [], classes=("default", "heavy"), generation=2))
    assert curves.summary("b") is None and curves.classes == ["default", "heavy"]
    curves.offer(_report("b", [(100.0, 0.02)], classes=("default",), generation=1))
    assert not curves._new and curves.classes == ["default", "heavy"]


def test_capacity_view_reads_the_instance_curves():
    """GET /api/capacity's per-backend estimate: the instance curve's slots,
    its service (the lognormal mean of its robust log statistics) and the
    lognormal's p99, for the class mix the workers answered."""
    from lb.admin.capacity import CapacityView
    from lb.core.config import Capacity

    workers = [SimpleNamespace(backends=[SimpleNamespace(name="b", class_responses=[100])])]
    agg = SimpleNamespace(live_workers=lambda: workers, window=lambda s: None)
    state = SimpleNamespace(agg=agg, cfg=SimpleNamespace(capacity=Capacity()), routable=lambda: ["b"],
                            fleet=SimpleNamespace(backends=lambda: [SimpleNamespace(name="b")]))
    view = CapacityView(state)
    view.curves = _run(_queue(3, 0.030, 0.3, 75.0, 60.0, seed=3))
    est = view.backends(now=view.curves.knee_at["b"])["b"]
    k, service, spread, _ = view.curves.summary("b")
    assert est.slots == k == 3 and est.known
    assert est.service_s == pytest.approx(service[0])
    assert est.service_p99_s == pytest.approx(est.service_s * math.exp(2.326 * spread))
    assert 0 < est.capacity_rps < est.saturation_rps == pytest.approx(3 / service[0])
