"""The guard that keeps the learned policy honest, one per worker.

A small control share of the requests `ml` would route is routed by P2C
peak-EWMA instead, on the same backends at the same moments.  The guard
keeps, for each arm (learned, control), the realised time to first byte and
the errors over a sliding window, and judges the learned arm every tick:

* it is *worse* when its error rate is above the control's by more than
  `ERR_MARGIN` and by more than `Z` standard errors, or, unless its error
  rate is below the control's by as much (errors come first), its mean
  latency of successful answers is above the control's by more than
  `LAT_MARGIN` (relative) and by more than `Z` standard errors of the
  difference;
* once worse, the worker routes by P2C-EWMA (mode fallback, reason `guard`)
  and keeps the *learned* arm at the small share, so the comparison goes on;
  it returns to the table only after a whole window in which the learned arm
  is not worse (too few outcomes to judge count as not worse).

Both arms need `MIN_SAMPLES` outcomes in the window before a verdict: until
then the guard says nothing (no fallback on too little evidence).  Latency is
capped at `LAT_CAP` seconds per outcome, so one stuck request cannot swing the
mean of a window.  The guard is I/O-free: outcomes and the clock come in,
a verdict goes out, and tests/unit/test_guard.py drives it directly.

The constants are statistical choices (a 5% practical margin, a 3-sigma
test, a 20 s window of 1 s buckets), not fitted to any benchmark.
"""

from __future__ import annotations

from math import sqrt

LEARNED = 0
CONTROL = 1

BUCKET = 1.0  # seconds per bucket
WINDOW = 20  # buckets in the sliding window
MIN_SAMPLES = 50  # outcomes per arm in the window before a verdict
LAT_MARGIN = 0.05  # learned mean latency may exceed control's by this share
ERR_MARGIN = 0.01  # learned error rate may exceed control's by this (absolute)
Z = 3.0  # standard errors a difference must exceed to count
LAT_CAP = 10.0  # seconds: one outcome's latency counts at most this


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

    def totals(self) -> tuple[int, int, int, float, float]:
        return sum(self.n), sum(self.errors), sum(self.lat_n), sum(self.lat_sum), sum(self.lat_sq)


class Guard:
    __slots__ = ("share", "arms", "bucket", "tripped", "clean_since", "verdict")

    def __init__(self, share: float) -> None:
        self.share = share  # of ml's picks routed by the other arm (0: the guard is off)
        self.arms = (_Arm(), _Arm())
        self.bucket = -1  # index (time // BUCKET) of the current bucket
        self.tripped = False  # True: the worker routes by P2C-EWMA (reason "guard")
        self.clean_since = -1  # bucket from which the learned arm has not been worse
        self.verdict: dict = {}  # the last judgement's figures (stats, /api/route)

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
        if b != self.bucket:
            if self.bucket < 0 or b - self.bucket >= WINDOW or b < self.bucket:
                # (b < bucket: the wall clock was stepped back; the window's
                # buckets no longer line up with the time, so it starts afresh,
                # and so does a clean stretch that began "after" now)
                for a in self.arms:
                    for i in range(WINDOW):
                        a.clear(i)
                if b < self.clean_since:
                    self.clean_since = b
            else:
                for k in range(self.bucket + 1, b + 1):
                    for a in self.arms:
                        a.clear(k % WINDOW)
            self.bucket = b
        worse = self.judge()
        if worse is None and not self.tripped:
            return True
        # Too few outcomes while tripped counts as "not worse": the learned arm
        # holds only the small share then, and below ~MIN_SAMPLES / share outcomes
        # per window it could never gather a verdict, leaving the table off for
        # good once traffic fell after a trip (no fallback on too little evidence
        # either way: an untripped guard at that traffic does not judge either).
        if worse:
            self.tripped = True
            self.clean_since = -1
        elif self.tripped:
            if self.clean_since < 0:
                self.clean_since = b
            elif b - self.clean_since >= WINDOW:
                self.tripped = False
                self.clean_since = -1
        return not self.tripped

    def judge(self) -> bool | None:
        """Is the learned arm worse than the control over the window?  None: too
        few outcomes in one of the arms to say."""
        ln, le, lk, ls, lq = self.arms[LEARNED].totals()
        cn, ce, ck, cs, cq = self.arms[CONTROL].totals()
        if ln < MIN_SAMPLES or cn < MIN_SAMPLES:
            self.verdict = {"learned_n": ln, "control_n": cn}
            return None
        pl, pc = le / ln, ce / cn
        p = (le + ce) / (ln + cn)
        se_p = sqrt(max(p * (1 - p), 1e-12) * (1 / ln + 1 / cn))
        err_worse = pl - pc > ERR_MARGIN and pl - pc > Z * se_p
        err_better = pc - pl > ERR_MARGIN and pc - pl > Z * se_p
        lat_worse = False
        ml = mc = 0.0
        if lk >= MIN_SAMPLES and ck >= MIN_SAMPLES:
            ml, mc = ls / lk, cs / ck
            vl = max(lq / lk - ml * ml, 0.0)
            vc = max(cq / ck - mc * mc, 0.0)
            se = sqrt(vl / lk + vc / ck)
            # errors come first: an arm that fails fewer requests is not worse for
            # answering the rest more slowly (the control arm's successes are quick
            # precisely because it sends a share to a backend that fails at once)
            lat_worse = ml - mc > LAT_MARGIN * mc and ml - mc > Z * se and not err_better
        self.verdict = {
            "learned_n": ln, "control_n": cn,
            "learned_errors": round(pl, 5), "control_errors": round(pc, 5),
            "learned_mean_s": round(ml, 6), "control_mean_s": round(mc, 6),
            "worse": bool(err_worse or lat_worse),
        }
        return err_worse or lat_worse
