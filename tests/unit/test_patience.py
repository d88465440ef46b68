"""How long clients wait (workers/patience.py), and ml's pick once every
backend is past it (workers/learned.py): the request goes where the most is
lost already, and a backend that answers in time wins over one that cannot."""

from __future__ import annotations

import random

from tests.mlfleet import ml_fleet
from workers.patience import Patience


def test_the_deadline_is_lbs_own_until_a_client_gives_up():
    p = Patience(60.0)
    assert p.deadline == 60.0 and p.given_up == 0
    assert Patience().deadline == float("inf")


def test_clients_sharing_a_timeout_set_the_deadline_there():
    p = Patience(60.0)
    for _ in range(50):
        p.gave_up(2.0)
    assert 2.0 <= p.deadline <= 2.2


def test_clients_that_leave_early_for_their_own_reasons_move_it_little():
    p = Patience(60.0)
    rng = random.Random(3)
    for _ in range(500):
        p.gave_up(0.05 if rng.random() < 0.1 else 2.0)
    assert 1.9 <= p.deadline <= 2.2


def test_more_patient_clients_raise_it_and_lbs_timeout_caps_it():
    p = Patience(10.0)
    for _ in range(30):
        p.gave_up(2.0)
    for _ in range(40):
        p.gave_up(5.0)
    assert 4.8 <= p.deadline <= 5.3
    for _ in range(40):
        p.gave_up(30.0)
    assert p.deadline == 10.0


def queued(b, seconds: float) -> None:
    """Give backend `b` (5 ms per request, one slot) a queue of `seconds`."""
    n = int(seconds / 0.005)
    b.inflight = n
    b.curve.work = n * 0.005


def test_past_the_deadline_everywhere_the_request_goes_where_most_is_lost():
    s, (b0, b1, b2), _ = ml_fleet(3, 100.0)
    queued(b0, 1.0)
    queued(b1, 1.5)
    queued(b2, 1.2)
    assert s.pick() is b0  # no client has given up: the least expected latency
    for _ in range(20):
        s.abandoned(0.8)  # clients wait 0.8 s: every backend is past 0.75 of it
    assert 0.8 <= s.patience[0].deadline <= 0.9
    assert s.lost_after[0] == s.DEADLINE * s.patience[0].deadline
    assert [s.pick() for _ in range(5)] == [b1] * 5
    queued(b2, 0.3)  # one backend answers in time again: it takes the requests
    assert s.pick() is b2


def test_a_backend_that_answers_in_time_wins_over_one_that_cannot():
    s, (b0, b1, b2), _ = ml_fleet(3, 100.0)
    queued(b0, 0.1)
    b0.failures = 3  # its last three answers failed: priced 16x, 3.2 s, but never past a failure's 1 s
    queued(b1, 0.45)  # 0.45 s, and as much again for the requests it queues behind it
    queued(b2, 1.2)
    assert s.pick() is b1  # by cost alone
    for _ in range(20):
        s.abandoned(0.5)
    assert s.pick() is b0  # b1's answer would come after its client has gone


def test_each_class_has_its_own_clients():
    s, (b0, b1, b2), _ = ml_fleet(3, 100.0, class_names=("api", "report"))
    for b in (b0, b1, b2):
        b.record(1, 0.005, False, 100.0, 0)
    queued(b0, 1.0)
    queued(b1, 1.5)
    queued(b2, 1.2)
    for _ in range(20):
        s.abandoned(0.8, 0)  # api clients wait 0.8 s
    assert s.patience[1].given_up == 0 and s.lost_after[1] == float("inf")
    assert s.pick(cls=0) is b1  # past the api clients' patience everywhere
    assert s.pick(cls=1) is b0  # report clients have not given up: the least latency


def test_a_fleet_change_keeps_what_the_clients_taught():
    """workers/fleet.py rebuilds the strategy over the new backend list; the
    deadline learned from the clients that gave up must survive it (the
    clients are the same), per class."""
    from lb.core import config
    from lb.core.messages import FleetBackend
    from workers import fleet
    from workers.worker import Worker

    cfg = config.from_dict({
        "strategy": "ml",
        "timeouts": {"upstream_response": 30.0},
        "classes": [{"name": "report", "path_prefix": "/report"}],
        "backends": [{"address": "127.0.0.1:9", "name": "a"}, {"address": "127.0.0.1:10", "name": "b"}]})
    w = Worker(cfg)
    s = w.strategy
    assert s.name == "ml" and s.patience[0].deadline == 30.0
    report = cfg.class_names.index("report")
    other = 1 - report
    for _ in range(60):
        s.abandoned(2.0, other)
        s.abandoned(9.0, report)
    before = [p.deadline for p in s.patience]
    assert before[other] < 2.5 and 8.0 < before[report] < 10.0
    changed = fleet.apply(w, [FleetBackend("a", "127.0.0.1:9", 1), FleetBackend("b", "127.0.0.1:10", 1),
                              FleetBackend("c", "127.0.0.1:11", 1, source="api")])
    assert changed and w.strategy is not s and len(w.strategy.backends) == 3
    assert [p.deadline for p in w.strategy.patience] == before
    assert w.strategy.lost_after == [w.strategy.DEADLINE * d for d in before]


def test_failures_in_a_row_never_price_a_backend_past_a_sure_failure():
    # b0 answers 503 at once, nine times in ten: it costs what a failure costs,
    # however long its run of failures; b1's queue is still answered in time
    # (clients wait 2 s), so it takes requests until its cost (its expected
    # latency and the wait it adds behind it) passes that, and then the failing
    # backend does (rather than b1's queue growing until its answers come
    # after its clients have gone)
    s, (b0, b1), _ = ml_fleet(2, 100.0)
    for _ in range(20):
        s.abandoned(2.0)
    b0.err, b0.failures = 0.9, 12
    s.priced = False  # no table has priced errors: the worker's own failure share
    queued(b1, 0.3)
    assert s.pick() is b1  # 0.6 s against b0's 1 s (0.9 s x 13^2, capped at a failure's cost)
    queued(b1, 0.8)  # within 0.75 of the clients' 2 s, but 1.6 s with the wait it adds
    assert s.pick() is b0
