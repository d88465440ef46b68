"""How `ml` prices a backend's errors before and after its first table.

The table prices errors for every worker (inference/policy.py), but it
comes a tick after the first answers, and the first table of a run only
says the inference process is warming up.  Until a table has priced errors,
the worker prices them itself from its own recent failure share
(`Backend.err`), in place of the table's priced error: a backend that fails fast from the
first request is not sent more because one of its answers happened to
succeed and reset its count of failures in a row.  The same holds whenever
no table may route (a table that says the model is not to be trusted, or one
that is late): the worker's own rows carry no priced error, so its own
failure share prices them again."""

from __future__ import annotations

from lb.core import messages as m
from tests.mlfleet import ml_fleet


def table(names, mode="learned", cost=True, reason="warming_up"):
    lat = [[0.005] * len(names)]
    return m.Table(epoch=1, seq=1, ts=100.0, interval=0.1, model_version="t", mode=mode,
                   reason="" if mode == "learned" else reason, backends=names,
                   classes=["default"], weights=[[1.0] * len(names)], latency=lat,
                   cost=lat if cost else [], exploration=0.0)


def fails_then_answers(b, now):
    b.record(0, 0.0004, True, now)  # a fast 503
    b.record(0, 0.0004, True, now)
    b.record(0, 0.005, False, now, 0)  # one answer: no failure in a row any more
    assert b.failures == 0 and 0.25 < b.err < 0.35


def test_before_a_table_priced_errors_the_workers_own_failure_share_prices_them():
    s, (b0, b1, b2), clock = ml_fleet(3, 100.0)
    assert s.pick() is b0  # equal curves: the first in order
    fails_then_answers(b0, 100.0)
    assert [s.pick() for _ in range(5)] == [b1] * 5
    # a warming-up table prices nothing: still the worker's own share
    s.set_table(table([b.name for b in (b0, b1, b2)], mode="warming_up", cost=False))
    s.check(100.0)
    assert s.pick() is b1
    # a learned table prices errors (here: none at all), and from then on it alone does
    s.set_table(table([b.name for b in (b0, b1, b2)]))
    assert s.check(100.0) == (True, "")
    assert s.pick() is b0


def test_when_no_table_may_route_the_workers_own_failure_share_prices_errors_again():
    s, (b0, b1, b2), clock = ml_fleet(3, 100.0)
    names = [b.name for b in (b0, b1, b2)]
    s.set_table(table(names))  # a learned table that prices errors: none anywhere
    assert s.check(100.0) == (True, "")
    fails_then_answers(b0, 100.0)
    assert s.pick() is b0  # the table alone prices errors while it routes
    # the model is not trusted: the worker's own rows route, and its own failure share prices b0
    s.set_table(table(names, mode="fallback", cost=False, reason="low_confidence"))
    assert s.check(100.0) == (False, "low_confidence")
    assert [s.pick() for _ in range(5)] == [b1] * 5
    # a learned table again: it alone prices errors
    s.set_table(table(names))
    assert s.check(100.0) == (True, "")
    assert s.pick() is b0
    # ... until it is late (older than twice its interval): the worker's own share again
    assert s.check(100.5) == (False, "stale")
    assert s.pick() is b1


def test_a_failure_share_that_fades_stops_costing():
    s, (b0, b1, b2), clock = ml_fleet(3, 100.0)
    fails_then_answers(b0, 100.0)
    for _ in range(40):  # answers, and nothing fails: the share falls to nothing
        b0.record(0, 0.005, False, 100.0, 0)
    assert b0.err == 0.0
    assert s.pick() is b0


def test_the_worker_reads_the_priced_error_back_with_the_tables_exponent():
    from inference import policy
    from workers.rows import ERR_PRICE

    assert ERR_PRICE == policy.ERROR_POWER / policy.LATENCY_POWER
