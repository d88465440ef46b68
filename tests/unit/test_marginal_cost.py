"""What `ml`'s pick charges for a request: its marginal cost.

Answered, a request costs its expected latency plus the wait its service adds
to the requests that queue behind it (`Curve.externality`); failed, it costs
`fail_cost`, the same whatever its class: FAIL_COST, or less once clients are
seen to give up sooner.  The pick weighs the two by the priced error
(workers/learned.py)."""

from __future__ import annotations

import pytest

from tests.mlfleet import ml_fleet
from workers.learned import FAIL_COST
from workers.loadcurve import Curve


def test_the_externality_is_a_slots_th_of_the_service_per_request_queued():
    cv = Curve(2)
    cv.slots = 2.0
    cv.service = [0.005, 0.04]
    assert cv.externality(1, 0, 0.0) == 0.0  # a free slot: nobody waits for it
    assert cv.externality(1, 1, 0.0) == 0.0  # the last free slot
    assert cv.externality(1, 5, 0.0) == pytest.approx(0.04 / 2 * 4)  # four queued behind the slots
    assert cv.externality(0, 5, 0.0) == pytest.approx(0.005 / 2 * 4)  # a light request delays them less
    cv.service = [0.005, 0.0]
    assert cv.externality(1, 5, 0.03) == pytest.approx(0.03 / 2 * 4)  # not answered yet: its price
    cv.pace = 2.0
    assert cv.externality(0, 5, 0.0) == pytest.approx(2 * 0.005 / 2 * 4)  # a slowed backend: its pace


def busy(b, service, inflight, now):
    """One slot, `inflight` requests of `service` each in flight."""
    cv = b.curve
    cv.slots = 1.0
    cv.service = [service]
    cv.work = inflight * service
    cv.quiet_since = now
    b.inflight = inflight


def test_a_request_that_would_hold_up_a_queue_goes_where_it_holds_up_nobody():
    """b0 serves the class in 40 ms, b1 in 200 ms.  With three requests on b0's
    single slot, the next waits 120 ms there: 160 ms, faster than b1's 200.
    But it also holds up, by its 40 ms, each request that queues behind it:
    as many as queue now, three.  Its marginal cost at b0 is 280 ms, and it
    goes to b1.  With one in flight it waits 40 ms and holds up one: 120 ms at
    b0."""
    s, (b0, b1), clock = ml_fleet(2, 100.0)
    busy(b0, 0.04, 3, 100.0)
    busy(b1, 0.2, 0, 100.0)
    s.refresh()
    assert b0.curve.expected(0, 3, 0.0, 100.0) == pytest.approx(0.16)
    assert s.pick() is b1
    busy(b0, 0.04, 1, 100.0)
    s.refresh()
    assert s.pick() is b0


def test_a_failure_costs_fail_cost_until_clients_are_seen_to_give_up_sooner():
    """b0 answers in 0.5 s; b1 fails 60% of requests fast (no table: the
    worker's own failure share prices them).  A failure costs FAIL_COST (1 s):
    b1 costs 0.6 s, more than b0's half second.  Once clients give up after
    0.8 s, a failure costs what a lost request does, past 0.75 of that: 0.6 s,
    b1 costs 0.36 s, and it takes the request."""
    s, (b0, b1), clock = ml_fleet(2, 100.0)
    busy(b0, 0.5, 0, 100.0)
    busy(b1, 0.005, 0, 100.0)
    b1.err = 0.6
    s.refresh()
    assert s.fail_cost(0) == FAIL_COST == 1.0
    assert s.pick() is b0
    s.abandoned(0.8)  # the first client to give up sets the patience
    s.refresh()
    assert s.fail_cost(0) == pytest.approx(0.6)
    assert s.pick() is b1


def test_a_failure_costs_the_same_whatever_the_class():
    """b1 fails half its requests fast and serves heavy requests 20x slower
    than light ones.  The failure costs the same for both classes, so the
    difference between b1's costs is the answered half's latency only."""
    s, (b0, b1), clock = ml_fleet(2, 100.0, class_names=("default", "heavy"))
    b1.curve.service = [0.002, 0.04]
    b1.err = 0.5
    s.refresh()
    fail = s.fail_cost(0)
    assert fail == s.fail_cost(1) == FAIL_COST
    row = s._own[1]
    # the pick's bound for b1, heavy, before a table prices errors: the lesser of its
    # service and a failure
    assert row[1][row[0].index(b1)] == pytest.approx(min(0.04, fail))
    # b0, idle and healthy, at 5 ms: both classes go there (b1 costs over half a second)
    b0.curve.service = [0.005, 0.1]
    s.refresh()
    assert s._table_pick(0) is b0 and s._table_pick(1) is b0
