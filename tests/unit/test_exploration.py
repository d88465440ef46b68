"""`ml`'s exploration (workers/learned.py `_stale`): a share of the picks goes
to a backend the worker has not heard from lately, where it learns
something, with a request of the class cheapest there.  A failure is news
too, and a backend that keeps failing is looked at less and less often:
after n failures in a row, only once it has been quiet for STALE x (n + 1)
seconds, at most STALE x BACKOFF."""

from __future__ import annotations

from tests.mlfleet import ml_fleet
from workers.learned import TableStrategy


def fleet(now: float):
    # exploration on every pick: each pick first looks for a stale backend
    return ml_fleet(3, now, exploration=1.0)


def test_a_backend_not_heard_from_for_a_second_is_explored():
    s, (b0, b1, b2), clock = fleet(100.0)
    for b in (b0, b1):
        b.record(0, 0.005, False, 100.9, 0)
    clock[0] = 100.95
    assert s._stale(s._own[0][0]) is None  # b2 answered 0.95 s ago
    clock[0] = 101.05
    assert s.pick() is b2


def test_a_failure_is_news_and_failures_in_a_row_back_exploration_off():
    s, (b0, b1, b2), clock = fleet(100.0)
    b2.record(0, 0.0005, True, 100.0)  # a fast 503
    assert b2.failures == 1 and b2.curve.seen == 100.0
    fresh = lambda t: [b.record(0, 0.005, False, t, 0) for b in (b0, b1)]  # noqa: E731
    fresh(101.5)
    clock[0] = 101.6  # 1.6 s quiet, one failure in a row: not before 2 s
    assert s._stale(s._own[0][0]) is None
    assert s.pick() is not b2  # (and the pick prices it by its failures)
    clock[0] = 102.1
    assert s.pick() is b2
    b2.record(0, 0.0005, True, 102.1)
    b2.failures = 40  # many in a row: the wait stops growing at BACKOFF
    fresh(111.95)
    clock[0] = 102.1 + TableStrategy.STALE * TableStrategy.BACKOFF - 0.1
    assert s._stale(s._own[0][0]) is None
    clock[0] += 0.2
    assert s._stale(s._own[0][0]) is b2
    b2.record(0, 0.005, False, clock[0], 0)  # it answers: the count and the wait start over
    assert b2.failures == 0


def test_a_backend_with_requests_in_flight_is_not_explored():
    s, (b0, b1, b2), clock = fleet(100.0)
    clock[0] = 105.0
    for b in (b0, b1, b2):
        b.inflight = 1
    assert s._stale(s._own[0][0]) is None
    b1.inflight = 0
    assert s._stale(s._own[0][0]) is b1


def test_a_stale_backend_is_looked_at_with_the_class_cheapest_there():
    s, (b0, b1, b2), clock = ml_fleet(3, 100.0, exploration=1.0, class_names=("default", "heavy"))
    for b in (b0, b1, b2):
        b.record(1, 0.050, False, 100.0, 0)  # heavy: 50 ms, the default class 5 ms
    for b in (b0, b1):
        b.record(0, 0.005, False, 101.5, 0)
    clock[0] = 101.6  # b2 quiet for 1.6 s
    assert s._stale(s._own[1][0], 1) is None  # not with a heavy request
    assert s._stale(s._own[0][0], 0) is b2  # with a light one
    assert s.pick((), 1) is not b2 and s.pick((), 0) is b2
    b2.curve.service[0] = 0.0  # the only class it has answered is the heavy one
    assert s._stale(s._own[1][0], 1) is None  # the light one is still priced cheaper (its prior)
    b2.curve.service[0] = 0.060  # now dearer than the heavy one there
    assert s._stale(s._own[1][0], 1) is b2


def test_a_class_a_backend_has_not_answered_is_priced_at_its_prior():
    """The look's class is chosen by price: a class the backend has not
    answered is priced as the rows price it (here the worker's own prior:
    the class's cost where the others answered it, at this backend's speed),
    not taken as news: a heavy request sent to see what heavy costs on a
    backend known only by its light answers can be the slowest of the run."""
    s, (b0, b1, b2), clock = ml_fleet(3, 100.0, exploration=1.0, class_names=("default", "heavy"))
    for b in (b0, b1):
        b.record(1, 0.050, False, 100.0, 0)  # heavy: 50 ms where it has been answered
    s.refresh()
    assert b2.curve.service[1] == 0.0  # b2 has answered only light requests (5 ms)
    for b in (b0, b1):
        b.record(0, 0.005, False, 101.5, 0)
    clock[0] = 101.6  # b2 quiet for 1.6 s
    assert s._own[1][3][b2.idx] > 0.040  # heavy at b2: priced like heavy elsewhere
    assert s._stale(s._own[1][0], 1) is None
    assert s._stale(s._own[0][0], 0) is b2
    assert s.pick((), 1) is not b2 and s.pick((), 0) is b2
