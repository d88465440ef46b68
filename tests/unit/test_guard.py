"""workers/guard.py: the learned arm against the P2C-EWMA control, driven
directly with synthetic outcomes and a synthetic clock."""

from __future__ import annotations

import random

from workers import guard as g


def feed(gd: g.Guard, rng: random.Random, t0: float, seconds: float, rate: float,
         learned_lat: float, control_lat: float, learned_err: float = 0.0, control_err: float = 0.0,
         share: float | None = 0.05) -> list[tuple[float, bool]]:
    """`rate` outcomes per second for `seconds`; returns (time, routes-learned) at each tick.
    `share` None: the guard's own share of the moment (`Guard.current`)."""
    out = []
    n = int(seconds * rate)
    for k in range(n):
        now = t0 + k / rate
        if k % max(1, int(rate / 10)) == 0:  # ticks at ~10 Hz, as a worker's table checks
            out.append((now, gd.tick(now)))
        # the minority arm gets `share` of the picks, whichever it is
        minority = g.LEARNED if gd.tripped else g.CONTROL
        arm = minority if rng.random() < (gd.current if share is None else share) else 1 - minority
        lat, err = (learned_lat, learned_err) if arm == g.LEARNED else (control_lat, control_err)
        gd.outcome(arm, rng.expovariate(1 / lat), rng.random() < err)
    return out


def test_equal_arms_never_trip():
    rng = random.Random(1)
    gd = g.Guard(0.05)
    out = feed(gd, rng, 0.0, 120.0, 1000, learned_lat=0.01, control_lat=0.01,
               learned_err=0.01, control_err=0.01)
    assert all(ok for _, ok in out)
    assert gd.verdict["learned_n"] > 0 and gd.verdict["control_n"] >= g.MIN_SAMPLES


def test_slower_learned_arm_trips_within_a_window():
    rng = random.Random(2)
    gd = g.Guard(0.05)
    out = feed(gd, rng, 0.0, 30.0, 1000, learned_lat=0.02, control_lat=0.01)
    first_off = next(t for t, ok in out if not ok)
    assert first_off <= g.WINDOW * g.BUCKET + 1.0
    assert gd.tripped and gd.verdict["worse"]


def test_a_small_latency_gap_is_not_enough():
    # 3% slower: inside the practical margin, never a fallback however many samples
    rng = random.Random(3)
    gd = g.Guard(0.05)
    out = feed(gd, rng, 0.0, 60.0, 2000, learned_lat=0.0103, control_lat=0.01)
    assert all(ok for _, ok in out)


def test_the_share_shrinks_while_the_table_is_clearly_better_and_is_back_when_it_goes_bad():
    rng = random.Random(11)
    gd = g.Guard(0.04)
    feed(gd, rng, 0.0, 40.0, 1000, learned_lat=0.01, control_lat=0.03, share=None)
    assert gd.verdict["better"] and not gd.tripped
    assert gd.current == 0.04 * g.SHRINK  # (20,000 outcomes a window: the floor is the quarter)
    # the table goes bad: the share is back to whole at the first verdict that
    # does not show it clearly better, and the guard trips within a window
    shares = []
    t = 40.0
    while not gd.tripped and t < 40.0 + 2 * g.WINDOW:
        feed(gd, rng, t, 1.0, 1000, learned_lat=0.03, control_lat=0.01, share=None)
        shares.append(gd.current)
        t += 1.0
    assert gd.tripped and t <= 40.0 + g.WINDOW + 2.0
    assert 0.04 in shares[:6], shares


def test_the_share_shrinks_in_a_runs_first_seconds_at_the_rate_seen_so_far():
    # 1,000 outcomes a second: a whole window would hold about 19,000, so the
    # quarter of the share keeps far more than 2 x MIN_SAMPLES control outcomes
    # in it.  Eight seconds in, the window holds 8,000: read as a window's
    # worth, they would keep the share at 100 / 8,000 = 1.25% and more.
    rng = random.Random(14)
    gd = g.Guard(0.04)
    feed(gd, rng, 0.0, 8.0, 1000, learned_lat=0.01, control_lat=0.03, share=None)
    assert gd.verdict["better"] and not gd.tripped
    assert gd.current == 0.04 * g.SHRINK


def test_a_mixed_verdict_keeps_the_whole_share():
    # the control arm fails more, but the table answers slower: not clearly better
    rng = random.Random(12)
    gd = g.Guard(0.04)
    feed(gd, rng, 0.0, 40.0, 1000, learned_lat=0.012, control_lat=0.01, control_err=0.1, share=None)
    assert not gd.tripped and not gd.verdict["better"] and gd.current == 0.04


def test_the_share_keeps_enough_control_outcomes_to_judge():
    # at 150 outcomes a second a window holds 3,000: the control arm keeps
    # 2 x MIN_SAMPLES of them, a share of 1/30, not the quarter of 0.04
    rng = random.Random(13)
    gd = g.Guard(0.04)
    feed(gd, rng, 0.0, 60.0, 150, learned_lat=0.01, control_lat=0.03, share=None)
    assert gd.verdict["better"] and gd.verdict["control_n"] >= g.MIN_SAMPLES
    assert 0.04 * g.SHRINK < gd.current < 0.04


def test_more_errors_trip():
    rng = random.Random(4)
    gd = g.Guard(0.05)
    feed(gd, rng, 0.0, 30.0, 1000, learned_lat=0.005, control_lat=0.01, learned_err=0.08, control_err=0.0)
    assert gd.tripped


def test_recovers_after_a_clean_window():
    rng = random.Random(5)
    gd = g.Guard(0.05)
    feed(gd, rng, 0.0, 30.0, 1000, learned_lat=0.03, control_lat=0.01)
    assert gd.tripped
    # the learned arm is as good again: the window first forgets the bad outcomes,
    # then one whole clean window must pass
    out = feed(gd, rng, 30.0, 3 * g.WINDOW * g.BUCKET, 1000, learned_lat=0.01, control_lat=0.01)
    back = next(t for t, ok in out if ok)
    assert 30.0 + g.WINDOW * g.BUCKET <= back <= 30.0 + 3 * g.WINDOW * g.BUCKET
    assert not gd.tripped


def test_returns_to_the_table_when_traffic_falls_after_a_trip():
    # Tripped at 1000 req/s; then 20 req/s with equal arms.  The learned arm's 2%
    # share gets ~8 outcomes per 20 s window, never MIN_SAMPLES: with no verdict
    # possible the table must not stay off for good.
    rng = random.Random(7)
    gd = g.Guard(0.02)
    feed(gd, rng, 0.0, 30.0, 1000, learned_lat=0.03, control_lat=0.01, share=0.02)
    assert gd.tripped
    out = feed(gd, rng, 30.0, 4 * g.WINDOW * g.BUCKET, 20, learned_lat=0.01, control_lat=0.01,
               share=0.02)
    back = next((t for t, ok in out if ok), None)
    assert back is not None and back >= 30.0 + g.WINDOW * g.BUCKET
    assert not gd.tripped and out[-1][1]


def test_a_wall_clock_stepped_back_does_not_hold_the_table_off():
    # The guard's clock is the wall clock (the worker's table check).  Tripped,
    # then the clock is stepped back an hour (NTP) and the arms are equal again:
    # the table must return within a few windows, not an hour later.
    rng = random.Random(8)
    gd = g.Guard(0.05)
    feed(gd, rng, 10_000.0, 30.0, 1000, learned_lat=0.03, control_lat=0.01)
    assert gd.tripped
    # equal again: the bad outcomes leave the window, a clean stretch begins
    feed(gd, rng, 10_030.0, 30.0, 1000, learned_lat=0.01, control_lat=0.01)
    assert gd.tripped and gd.clean_since > 0
    out = feed(gd, rng, 10_060.0 - 3600.0, 3 * g.WINDOW * g.BUCKET, 1000, learned_lat=0.01,
               control_lat=0.01)
    assert any(ok for _, ok in out) and not gd.tripped


def test_no_verdict_on_too_few_outcomes():
    rng = random.Random(6)
    gd = g.Guard(0.05)
    # 10 req/s: the control arm gets ~5 outcomes per 10 s window, never enough
    out = feed(gd, rng, 0.0, 60.0, 10, learned_lat=0.1, control_lat=0.01)
    assert all(ok for _, ok in out)
    assert "worse" not in gd.verdict


def test_one_stuck_request_is_capped():
    gd = g.Guard(0.05)
    gd.tick(0.0)
    for _ in range(200):
        gd.outcome(g.LEARNED, 0.01, False)
        gd.outcome(g.CONTROL, 0.01, False)
    gd.outcome(g.LEARNED, 3600.0, False)  # one request that took an hour
    assert gd.tick(0.5)
    assert gd.verdict["learned_mean_s"] < 0.1


def test_a_table_that_routes_badly_is_caught_and_held_off():
    """The ml strategy with a table that sends everything to the slowest
    backend (it prices the fast ones at a thousand times their latency, as
    if they failed most requests, so the curves cannot correct it): the
    guard's P2C-EWMA share does far better on the same backends, so check()
    falls back with reason "guard", and the table keeps only the guard's
    small share of picks."""
    from lb.core import messages as m
    from lb.core.config import Backend as BackendConfig
    from workers.backend import Backend
    from workers.learned import TableStrategy
    from workers.strategies import make_strategy

    service = {"slow": 0.05, "fast1": 0.005, "fast2": 0.005}
    bs = [Backend(BackendConfig(address=f"127.0.0.1:{9000 + i}", name=n), 1, i) for i, n in enumerate(service)]
    s = make_strategy("ml", bs, decay=10.0, seed=4, guard_share=0.05)
    assert isinstance(s, TableStrategy) and s.guard is not None
    rng = random.Random(7)
    now = 1000.0
    reasons = []
    picked = []
    for k in range(40_000):  # 1,000 req/s for 40 s, one at a time
        if k % 100 == 0:  # a fresh (bad) table and a mode check every 100 ms, as a worker does
            s.set_table(m.Table(epoch=1, seq=k + 1, ts=now, interval=0.1, model_version="bad", mode="learned",
                                reason="", backends=list(service), classes=["default"],
                                weights=[[0.98, 0.01, 0.01]], latency=[[0.05, 0.005, 0.005]],
                                cost=[[0.05, 5.0, 5.0]], exploration=0.0))
            reasons.append((now, s.check(now)[1]))
        b = s.pick((), 0)
        arm = s.arm
        lat = rng.expovariate(1 / service[b.name])
        b.record(0, lat, False, now)
        if arm >= 0:  # (as the dispatcher: a pick no arm made is credited to none)
            s.guard.outcome(arm, lat, False)
        picked.append((now, b.name))
        now += 0.001
    first_guard = next(t for t, r in reasons if r == "guard")
    assert first_guard - 1000.0 <= 12.0, "caught within about one window"
    held = first_guard + g.WINDOW * g.BUCKET
    assert all(r == "guard" for t, r in reasons if first_guard < t < held), "held off a whole window"
    late = [n for t, n in picked if first_guard + 1.0 < t < held]
    assert late.count("slow") / len(late) < 0.1, "after the verdict the table routes only its small share"


def test_fewer_errors_outweigh_slower_successes():
    # the control arm sends a share to a backend that fails at once, so its
    # successes are quicker (less load on the others) but many requests fail:
    # the learned arm, slower but failing far less, is not worse
    rng = random.Random(8)
    gd = g.Guard(0.05)
    out = feed(gd, rng, 0.0, 40.0, 1000, learned_lat=0.012, control_lat=0.008,
               learned_err=0.02, control_err=0.4)
    assert all(ok for _, ok in out)
    assert gd.verdict["worse"] is False


def feed_shared(gd: g.Guard, rng: random.Random, t0: float, seconds: float, rate: float,
                learned_system: float, control_system: float, flatter: float = 0.75) -> list[tuple[float, bool]]:
    """Outcomes on a fleet both arms share: every request's mean latency is
    that of the arm routing the majority (`learned_system` while the table
    routes, `control_system` while P2C-EWMA does), and the minority arm's
    requests take `flatter` of it (they find the queues the majority left)."""
    out = []
    share = gd.share
    for k in range(int(seconds * rate)):
        now = t0 + k / rate
        if k % max(1, int(rate / 10)) == 0:
            out.append((now, gd.tick(now)))
        major = g.CONTROL if gd.tripped else g.LEARNED
        arm = 1 - major if rng.random() < share else major
        mean = control_system if major == g.CONTROL else learned_system
        gd.outcome(arm, rng.expovariate(1 / (mean * (flatter if arm != major else 1.0))), False)
    return out


def test_a_trip_the_switchback_does_not_confirm_is_undone():
    # The table routing everything does better than P2C-EWMA routing
    # everything (10 ms against 20 ms), but the 5% control share, flattered,
    # reads 7.5 ms beside the table's 10: the share's comparison trips.  The
    # switchback sees P2C-EWMA do worse with the majority and hands the
    # table back; the false alarms in a row hold further trips off longer.
    rng = random.Random(11)
    gd = g.Guard(0.05)
    out = feed_shared(gd, rng, 0.0, 120.0, 1000, learned_system=0.010, control_system=0.020)
    off = [t for t, ok in out if not ok]
    assert off, "the flattered share trips the guard"
    assert gd.false_alarms >= 2
    assert len(off) / len(out) < 0.2, "the table routes most of the time (the old rule: 95% off)"
    assert out[-1][1] or gd.false_alarms >= 3


def test_a_trip_the_switchback_confirms_holds():
    # The table routing everything is worse (30 ms against 10): the share's
    # comparison trips, the switchback confirms it, and P2C-EWMA routes for at
    # least a window although the table's flattered share then reads better.
    rng = random.Random(12)
    gd = g.Guard(0.05)
    out = feed_shared(gd, rng, 0.0, 40.0, 1000, learned_system=0.030, control_system=0.010)
    first = next(t for t, ok in out if not ok)
    assert first <= 10.0
    assert all(not ok for t, ok in out if first < t < first + g.WINDOW * g.BUCKET)
    assert gd.false_alarms == 0


def test_an_overload_s_first_seconds_do_not_trip():
    # Ten quiet seconds with the arms equal, then the fleet goes into
    # overload: every latency rises 50-fold, the control share's a third
    # less than the table's (it is flattered most when the queues are long).
    # Pooled over the window, the overload's seconds dominate both means and
    # read as a table 50% slower, by many standard errors; bucket by bucket
    # they are two ratios among twelve, and nothing trips.
    rng = random.Random(13)
    gd = g.Guard(0.05)
    quiet = feed(gd, rng, 0.0, 10.0, 1000, learned_lat=0.010, control_lat=0.010)
    rise = feed(gd, rng, 10.0, 2.9, 1000, learned_lat=0.6, control_lat=0.4)
    assert all(ok for _, ok in quiet + rise)
    v = gd.verdict
    assert v["learned_mean_s"] > (1 + g.SIDE_MARGIN) * v["control_mean_s"], v  # what a pooled mean reads
    assert v["buckets"] >= g.MIN_BUCKETS and v["latency_ratio"] < 1 + g.SIDE_MARGIN, v


def test_a_control_pick_past_the_clients_patience_is_charged_not_sent():
    """P2C-EWMA picks between two random backends, so on a fleet with two slow
    ones it sends a share of its picks to one of them whatever their latency.
    A control pick on a backend whose peak EWMA is already past the point
    where clients give up is not sent: the control arm is charged an error
    (the request would have been lost there) and the curves route it."""
    from tests.mlfleet import ml_fleet

    s, (fast, slow1, slow2), clock = ml_fleet(3, 100.0, guard_share=1.0)  # every pick: the control arm
    for age in (2.0,) * 30:  # clients give up after 2 s
        s.abandoned(age)
    assert 1.0 < s.lost_after[0] < 2.0
    slow1.ewma = slow2.ewma = 3.0
    control = s.guard.arms[g.CONTROL]
    picks = []
    for _ in range(300):
        picks.append(s.pick())
    assert slow1 not in picks and slow2 not in picks and picks.count(fast) == 300
    assert sum(control.errors) >= 50, "the pair of slow backends (a third of the picks) is charged as errors"
    slow1.ewma = slow2.ewma = 0.5  # slow, but in time: P2C-EWMA's picks go there again
    assert {s.pick() for _ in range(300)} >= {slow1, slow2}
