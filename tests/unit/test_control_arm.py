"""The guard's control arm and failing backends (workers/learned.py, workers/guard.py).

P2C-EWMA, the guard's control arm, sees no errors.  A control pick that
lands on a backend whose last outcome from this worker was a failure is not
sent: the control arm is charged the outcome the request would likely have
had there (an error with the backend's recent failure share, `Backend.err`,
else its peak EWMA), and the curves route the request."""

from __future__ import annotations

import pytest

from lb.core.config import Backend as BackendConfig
from tests.mlfleet import ml_fleet
from workers import guard as g
from workers.backend import ERR_LEARN, Backend
from workers.learned import NO_ARM


def test_the_failure_share_rises_with_failures_and_falls_with_answers():
    b = Backend(BackendConfig(address="127.0.0.1:9000", name="b"), 1, 0)
    b.record(0, 0.0005, True, 1.0)
    assert b.err == pytest.approx(ERR_LEARN)
    b.record(0, 0.0005, True, 1.0)
    assert b.err == pytest.approx(1 - (1 - ERR_LEARN) ** 2)
    b.record(0, 0.005, False, 1.0)
    assert b.failures == 0 and b.err == pytest.approx((1 - (1 - ERR_LEARN) ** 2) * (1 - ERR_LEARN))
    for _ in range(40):
        b.record(0, 0.005, False, 1.0)
    assert b.err == 0.0  # (tiny shares are dropped)


def test_the_control_arm_is_charged_rather_than_sent_to_a_failing_backend():
    s, (b0, b1), clock = ml_fleet(2, 100.0, guard_share=1.0)  # every pick is the control arm's
    s.guard.tick(100.0)
    b0.inflight = 3  # P2C-EWMA prefers the idle b1
    assert s.pick() is b1 and s.arm == g.CONTROL
    b1.record(0, 0.0005, True, 100.0)  # a fast 503
    err = b1.err
    assert s.pick() is b0 and s.arm == NO_ARM  # the table routes; the guard judges no arm by it
    control = s.guard.arms[g.CONTROL]
    assert sum(control.n) == 1 and sum(control.errors) == pytest.approx(err)
    assert sum(control.lat_n) == pytest.approx(1 - err)
    assert sum(control.lat_sum) == pytest.approx((1 - err) * b1.ewma)


def test_the_guard_counts_a_charged_outcome_by_its_probability():
    gd = g.Guard(0.05)
    gd.tick(10.0)
    for _ in range(2 * g.MIN_SAMPLES):  # (latency is judged from MIN_SAMPLES successes)
        gd.outcome(g.LEARNED, 0.01, False)
        gd.expect(g.CONTROL, 0.5, 0.01)
    assert gd.judge() is False  # half the control's requests would have failed: the learned arm is not worse
    v = gd.verdict
    assert v["control_n"] == 2 * g.MIN_SAMPLES and v["control_errors"] == 0.5 and v["learned_errors"] == 0.0
    assert v["control_mean_s"] == pytest.approx(0.01)


def test_an_answer_lets_the_control_arm_send_there_again_and_a_tripped_guard_never_defers():
    s, (b0, b1), clock = ml_fleet(2, 100.0, guard_share=1.0)
    s.guard.tick(100.0)
    b0.inflight = 3
    b1.record(0, 0.0005, True, 100.0)
    assert s.pick() is b0 and s.arm == NO_ARM
    b1.record(0, 0.005, False, 100.0, 0)  # it answers
    assert s.pick() is b1 and s.arm == g.CONTROL
    b1.record(0, 0.0005, True, 100.0)
    s.guard.tripped = s.tripped = True  # P2C-EWMA routes: every pick but the learned arm's share is its own
    s.guard.share = s.guard.current = 0.0
    assert s.pick() is b1 and s.arm == g.CONTROL
