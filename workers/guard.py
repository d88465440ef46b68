"""The guard that keeps the learned policy honest, one per worker.

A small control share of the requests `ml` would route is routed by P2C
peak-EWMA instead, on the same backends at the same moments.  The guard
keeps, for each arm (learned, control), the realised time to first byte and
the errors in 1 s buckets over a sliding window, and judges the learned arm
every tick, side by side: over the window's buckets routed as now (since the
last trip or return; the bucket after a switch is left out, as it answers
requests picked before):

* it is *worse* when its error rate is above the control's by more than
  `ERR_MARGIN` and by more than `Z` standard errors, or, unless its error
  rate is below the control's by as much (errors come first), its mean
  latency of successful answers is above the control's by more than
  `SIDE_MARGIN` (relative), compared bucket by bucket: the ratio of the
  arms' means in each complete bucket, averaged, above the margin by more
  than `Z` standard errors read from the buckets' spread (`paired_latency`:
  a fleet going into overload raises every latency within seconds, and a
  pooled mean reads the minority arm's handful of answers from before the
  rise as a difference of arms);
* once worse, the worker routes by P2C-EWMA (mode fallback, reason `guard`)
  and keeps the *learned* arm at the small share, so the comparison goes on;
  it returns to the table only after a whole window in which the learned arm
  is not worse (too few outcomes to judge count as not worse);
* the small share flatters whichever arm holds it: its few requests find
  the queues the other arm's routing left, and add little to them.  On
  training fleets where ml fails fewer requests or answers faster than
  every other policy, the control share's mean latency still read up to
  35% below the learned arm's (median over a run; more in an overload).
  Hence `SIDE_MARGIN` rather than `LAT_MARGIN` side by side (on those
  fleets 0.25 and 0.5 did the same, and both removed most of the trips that
  cost them errors), and a trip is checked by switchback: the control
  arm's outcomes in the buckets where it routes the majority against the
  learned arm's in those where it did, pooled, with `LAT_MARGIN`.  When those show
  the learned arm no worse (the same margins, with `Z` standard errors of
  the difference inside them), the trip was a false alarm: the table routes
  again at once, and the share's comparison may not trip it for HOLD
  buckets, doubled with each false alarm in a row up to a window.  A trip
  they confirm is not clean while the learned arm's routing is in the
  window, so P2C-EWMA routes for at least two windows.

The share the control arm takes shrinks while the table is clearly the
better arm: when, over the window routed as now, the control arm fails
more by `ERR_MARGIN` and `Z` standard errors, or its mean latency is above
the learned arm's by `SIDE_MARGIN` and `Z` standard errors (the mirror of
*worse*; the share flatters the control arm, so this is strong evidence),
and it does no better on the other side as read (fails no fewer, answers
no faster: a control arm that fails more but answers faster, as on an
overloaded development fleet, is a mixed picture), the share halves, once per bucket, down to a
quarter of `share` (`SHRINK`), never so low that the window would hold
fewer than twice `MIN_SAMPLES` control outcomes at the rate of the last
window (in a run's first seconds, at the rate of the buckets filled so
far: read as a whole window's worth, the few seconds' outcomes held the
whole share, at the default 2% until some 5,000 had come, most of an 8 s
benchmark run);
at any other verdict, or none, it is back to `share` at once.  The
control arm's requests are real requests, and on a fleet where P2C-EWMA
queues them badly they are the slowest the worker sends: in the simulator
they made most of `ml`'s p99.9 on evaluation fleets where P2C-EWMA fails
or times out requests by the percent.  A table that goes bad is still
caught: the first verdict that does not show it clearly better restores
the share, and the judging goes on at it.

Both arms need `MIN_SAMPLES` outcomes in the window before a verdict, and
the latency side by side `MIN_BUCKETS` complete buckets: until then the
guard says nothing (no fallback on too little evidence).  Latency is
capped at `LAT_CAP` seconds per outcome, so one stuck request cannot swing the
mean of a window.  The guard is I/O-free: outcomes and the clock come in,
a verdict goes out, and tests/unit/test_guard.py drives it directly.

The constants are statistical choices (a 5% practical margin, a 3-sigma
test, a 20 s window of 1 s buckets), not fitted to any benchmark, except
`SIDE_MARGIN`, read from the flattery measured on training fleets
1000-1079 (bench/sim.py, two workers).
"""

from __future__ import annotations

from math import exp, log, log1p, sqrt

LEARNED = 0
CONTROL = 1

BUCKET = 1.0  # seconds per bucket
WINDOW = 20  # buckets in the sliding window
MIN_SAMPLES = 50  # outcomes per arm in the window before a verdict
LAT_MARGIN = 0.05  # learned mean latency may exceed control's by this share (switchback)
SIDE_MARGIN = 0.25  # ... side by side, where the control share is flattered (module docstring)
ERR_MARGIN = 0.01  # learned error rate may exceed control's by this (absolute)
Z = 3.0  # standard errors a difference must exceed to count
LAT_CAP = 10.0  # seconds: one outcome's latency counts at most this
MIN_BUCKETS = 3  # complete buckets with both arms' answers before the side-by-side latency test
SHRINK = 0.25  # the least share, relative to `share`, while the learned arm is clearly better
HOLD = 2  # buckets a false alarm keeps the share's comparison from tripping (doubled per false alarm in a row)
MIXED = -1  # a bucket in which neither arm routed the majority throughout (a switch, or the one after)


class _Arm:
    __slots__ = ("n", "errors", "lat_n", "lat_sum", "lat_sq")

    def __init__(self) -> None:
        self.n = [0] * WINDOW  # outcomes per bucket
        self.errors = [0] * WINDOW
        self.lat_n = [0] * WINDOW  # successful outcomes (latency counted)
        self.lat_sum = [0.0] * WINDOW
        self.lat_sq = [0.0] * WINDOW

    def clear(self, i: int) -> None:
        self.n[i] = self.errors[i] = self.lat_n[i] = 0
        self.lat_sum[i] = self.lat_sq[i] = 0.0

    def totals_in(self, buckets: list[int]) -> tuple[int, int, int, float, float]:
        """The totals over the given bucket indices."""
        return (sum([self.n[i] for i in buckets]), sum([self.errors[i] for i in buckets]),
                sum([self.lat_n[i] for i in buckets]), sum([self.lat_sum[i] for i in buckets]),
                sum([self.lat_sq[i] for i in buckets]))


class Guard:
    __slots__ = ("share", "current", "better", "arms", "bucket", "tripped", "clean_since", "verdict", "routed",
                 "switched", "false_alarms", "quiet_until", "filled_from")

    def __init__(self, share: float) -> None:
        self.share = share  # of ml's picks routed by the other arm at most (0: the guard is off)
        self.current = share  # ... now (it shrinks while the learned arm is clearly better)
        self.better = False  # the last verdict: the learned arm clearly better (the mirror of worse)
        self.arms = (_Arm(), _Arm())
        self.bucket = -1  # index (time // BUCKET) of the current bucket
        self.tripped = False  # True: the worker routes by P2C-EWMA (reason "guard")
        self.clean_since = -1  # bucket from which the learned arm has not been worse
        self.verdict: dict = {}  # the last judgement's figures (stats, /api/route)
        self.routed = [MIXED] * WINDOW  # per bucket: the arm that routed the majority (or MIXED)
        self.switched = -2  # bucket of the last trip or return (none: the first bucket counts)
        self.false_alarms = 0  # trips in a row the switchback did not confirm
        self.quiet_until = -1  # bucket before which the share's comparison does not trip
        self.filled_from = 0  # first bucket of the window's outcomes (since the window last started afresh)

    def outcome(self, arm: int, latency: float, error: bool) -> None:
        """One realised outcome of a request routed by `arm` (in the current bucket)."""
        a = self.arms[arm]
        i = self.bucket % WINDOW
        a.n[i] += 1
        if error:
            a.errors[i] += 1
        else:
            lat = latency if latency < LAT_CAP else LAT_CAP
            a.lat_n[i] += 1
            a.lat_sum[i] += lat
            a.lat_sq[i] += lat * lat

    def expect(self, arm: int, p_error: float, latency: float) -> None:
        """An outcome `arm` is charged without the request being sent: an error
        with probability `p_error`, else `latency` seconds (both counted by
        their probability)."""
        a = self.arms[arm]
        i = self.bucket % WINDOW
        a.n[i] += 1
        a.errors[i] += p_error
        w = 1.0 - p_error
        lat = latency if latency < LAT_CAP else LAT_CAP
        a.lat_n[i] += w
        a.lat_sum[i] += w * lat
        a.lat_sq[i] += w * lat * lat

    def tick(self, now: float) -> bool:
        """Advance the window to `now` and judge.  Returns True when the learned
        arm may route (not tripped)."""
        b = int(now // BUCKET)
        new_bucket = b != self.bucket
        if new_bucket:
            if self.bucket < 0 or b - self.bucket >= WINDOW or b < self.bucket:
                # (b < bucket: the wall clock was stepped back; the window's
                # buckets no longer line up with the time, so it starts afresh,
                # and so does a clean stretch that began "after" now)
                for a in self.arms:
                    for i in range(WINDOW):
                        a.clear(i)
                self.routed = [MIXED] * WINDOW
                if b < self.clean_since:
                    self.clean_since = b
                if b < self.switched:
                    self.switched = b
                if b < self.bucket:
                    self.quiet_until = -1
                self.filled_from = b
                first = b
            else:
                first = self.bucket + 1
            arm = CONTROL if self.tripped else LEARNED
            for k in range(first, b + 1):
                i = k % WINDOW
                for a in self.arms:
                    a.clear(i)
                self.routed[i] = arm if k > self.switched + 1 else MIXED
            self.bucket = b
        worse = self.judge()
        if not self.tripped:
            if new_bucket:
                self._adapt()
            if worse and b >= self.quiet_until:
                self._switch(b, True)
            elif self.false_alarms and b >= self.quiet_until + WINDOW:
                self.false_alarms = 0  # a window without a trip: the next false alarm holds for HOLD again
            return not self.tripped
        back = self.switchback()
        if back is False:
            # P2C-EWMA routing the majority did no better than the table did:
            # the share's comparison misled, and the table routes again
            self.false_alarms += 1
            self.quiet_until = b + min(HOLD << min(self.false_alarms - 1, 8), WINDOW)
            self._switch(b, False)
            return True
        if back:
            # confirmed: the table routing did worse than P2C-EWMA routing does,
            # and no stretch is clean while that is in the window
            self.false_alarms = 0
            worse = True
        # Too few outcomes while tripped counts as "not worse": the learned arm
        # holds only the small share then, and below ~MIN_SAMPLES / share outcomes
        # per window it could never gather a verdict, leaving the table off for
        # good once traffic fell after a trip (no fallback on too little evidence
        # either way: an untripped guard at that traffic does not judge either).
        if worse:
            self.clean_since = -1
        else:
            if self.clean_since < 0:
                self.clean_since = b
            elif b - self.clean_since >= WINDOW:
                self._switch(b, False)
        return not self.tripped

    def _adapt(self) -> None:
        """The control share for the next bucket (module docstring): halved
        while the last verdict shows the learned arm clearly better, down to
        SHRINK x `share` and to twice MIN_SAMPLES control outcomes a window;
        else `share`.  Called as a bucket starts: the window's outcomes are
        those of its WINDOW - 1 complete buckets, or, while fewer have been
        filled since it started afresh (the first seconds of a run), of
        those few, scaled to WINDOW - 1 at the same rate."""
        if not self.better:
            self.current = self.share
            return
        la, ca = self.arms
        seen = sum(la.n) + sum(ca.n)  # outcomes in the window: the rate the share is taken of
        filled = self.bucket - self.filled_from  # complete buckets since the window started afresh
        if 0 < filled < WINDOW - 1:
            seen *= (WINDOW - 1) / filled
        least = max(self.share * SHRINK, 2.0 * MIN_SAMPLES / seen if seen else self.share)
        self.current = min(self.share, max(least, self.current * 0.5))

    def _switch(self, b: int, trip: bool) -> None:
        self.tripped = trip
        self.current = self.share
        self.better = False
        self.clean_since = -1
        self.switched = b
        self.routed[b % WINDOW] = MIXED

    def switchback(self) -> bool | None:
        """Is the learned arm, over the buckets in which it routed the majority,
        worse than the control arm over those in which it did (`_pooled`)?
        True: worse; False: shown to be no worse; None: not known yet."""
        mine, theirs = self.routed_by(LEARNED), self.routed_by(CONTROL)
        if not mine or not theirs:
            return None
        worse, fine = _pooled(self.arms[LEARNED].totals_in(mine), self.arms[CONTROL].totals_in(theirs))
        return True if worse else (False if fine else None)

    def routed_by(self, arm: int) -> list[int]:
        """The window's buckets (indices) in which `arm` routed the majority."""
        return [i for i in range(WINDOW) if self.routed[i] == arm]

    def judge(self) -> bool | None:
        """Is the learned arm worse than the control side by side, over the
        window's buckets routed as now?  Errors pooled over those buckets;
        latency paired by bucket (`paired_latency`).  None: too few outcomes
        in one of the arms to say."""
        now = self.routed_by(CONTROL if self.tripped else LEARNED)
        learned, control = self.arms[LEARNED].totals_in(now), self.arms[CONTROL].totals_in(now)
        ln, cn = learned[0], control[0]
        if ln < MIN_SAMPLES or cn < MIN_SAMPLES:
            self.better = False
            self.verdict = {"learned_n": ln, "control_n": cn, "share": self.current}
            return None
        err_worse, err_better, _, pl, pc = _errors(learned, control)
        ratio, buckets, lat_worse, lat_better = self.paired_latency(now)
        worse = err_worse or (lat_worse and not err_better)
        # clearly better on one side, and no worse on the other as read
        self.better = (err_better or lat_better) and pl <= pc and ratio <= 1.0
        self.verdict = {
            "learned_n": ln, "control_n": cn,
            "learned_errors": round(pl, 5), "control_errors": round(pc, 5),
            "learned_mean_s": round(learned[3] / learned[2], 6) if learned[2] else 0.0,
            "control_mean_s": round(control[3] / control[2], 6) if control[2] else 0.0,
            "latency_ratio": round(ratio, 4), "buckets": buckets,
            "worse": bool(worse), "better": bool(self.better), "share": self.current,
        }
        return worse

    def paired_latency(self, buckets: list[int]) -> tuple[float, int, bool]:
        """The learned arm's mean latency over the control's, side by side:
        the ratio of the arms' means in each complete bucket of `buckets`
        (both arms answered there), averaged in log terms with each bucket
        weighted by its answers (n_l n_c / (n_l + n_c)).  Worse when that
        average is above SIDE_MARGIN and Z standard errors, the error read
        from the spread of the buckets' ratios, which holds the load's
        changes within the window as well as the sampling (a pooled mean
        over a window in which the fleet goes into overload reads the
        minority arm's handful of answers as a difference of arms).  Needs
        MIN_BUCKETS such buckets and MIN_SAMPLES control answers in them.
        Better is the mirror: below 1 / (1 + SIDE_MARGIN) by Z standard errors.
        Returns (ratio, buckets used, worse, better)."""
        la, ca = self.arms
        cur = self.bucket % WINDOW
        logs: list[float] = []
        weights: list[float] = []
        answers = 0
        for i in buckets:
            kl, kc = la.lat_n[i], ca.lat_n[i]
            if i == cur or kl <= 0 or kc <= 0:
                continue
            ml, mc = la.lat_sum[i] / kl, ca.lat_sum[i] / kc
            logs.append(log(max(ml, 1e-9) / max(mc, 1e-9)))
            weights.append(kl * kc / (kl + kc))
            answers += kc
        if not logs:
            return 1.0, 0, False, False
        total = sum(weights)
        mean = sum(w * x for w, x in zip(weights, logs)) / total
        if len(logs) < MIN_BUCKETS or answers < MIN_SAMPLES:
            return exp(mean), len(logs), False, False
        spread = sum(w * (x - mean) ** 2 for w, x in zip(weights, logs)) / total
        n_eff = total * total / sum(w * w for w in weights)  # (buckets' worth of weight)
        se = sqrt(spread / max(n_eff - 1.0, 1.0))
        margin = log1p(SIDE_MARGIN)
        return exp(mean), len(logs), mean > margin and mean > Z * se, -mean > margin and -mean > Z * se


def _pooled(learned: tuple, control: tuple) -> tuple[bool, bool]:
    """The switchback's test, on the arms' totals (`_Arm.totals_in`): is the
    learned arm worse (errors by ERR_MARGIN, or, unless it fails fewer,
    mean latency by LAT_MARGIN, each by Z standard errors), and is it shown
    to be no worse (each difference plus Z standard errors inside its
    margin)?  Neither, with fewer than MIN_SAMPLES outcomes on a side."""
    ln, _, lk, ls, lq = learned
    cn, _, ck, cs, cq = control
    if ln < MIN_SAMPLES or cn < MIN_SAMPLES:
        return False, False
    err_worse, err_better, err_fine, _, _ = _errors(learned, control)
    if lk < MIN_SAMPLES or ck < MIN_SAMPLES:
        return err_worse, err_fine  # (too few answers to compare latency: the errors decide)
    ml, mc = ls / lk, cs / ck
    se = sqrt(max(lq / lk - ml * ml, 0.0) / lk + max(cq / ck - mc * mc, 0.0) / ck)
    # errors come first: an arm that fails fewer requests is not worse for
    # answering the rest more slowly (the control arm's successes are quick
    # precisely because it sends a share to a backend that fails at once)
    lat_worse = ml - mc > LAT_MARGIN * mc and ml - mc > Z * se and not err_better
    lat_fine = err_better or ml - mc + Z * se <= LAT_MARGIN * mc
    return err_worse or lat_worse, err_fine and lat_fine


def _errors(learned: tuple, control: tuple) -> tuple[bool, bool, bool, float, float]:
    """The arms' error rates compared: (worse, better, shown no worse, learned
    rate, control rate); worse and better by ERR_MARGIN and Z standard errors,
    no worse when the difference plus Z standard errors is within ERR_MARGIN."""
    ln, le = learned[0], learned[1]
    cn, ce = control[0], control[1]
    pl, pc = le / ln, ce / cn
    p = (le + ce) / (ln + cn)
    se_p = sqrt(max(p * (1 - p), 1e-12) * (1 / ln + 1 / cn))
    worse = pl - pc > ERR_MARGIN and pl - pc > Z * se_p
    better = pc - pl > ERR_MARGIN and pc - pl > Z * se_p
    return worse, better, pl - pc + Z * se_p <= ERR_MARGIN, pl, pc
