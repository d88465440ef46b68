"""The load curve of a backend, as one worker sees it: what a request of each
class costs there when it does not wait, and how that grows with the requests
this worker has in flight to it.  (The admin keeps these curves of the
backends as the whole instance loads them, for capacity, and fits their slot
counts its own way: lb/admin/loadcurves.py.)

A backend serves about `slots` requests at once and queues the rest, so the
next request of class c, sent while n others are in flight, is expected to take

    service[c] + max(0, n + 1 - slots) / slots x (mean service of the n in flight)

(the shortest-expected-delay rule of queueing theory, for a k-server queue;
the requests ahead are priced by their own classes, `work`, since a light
request queued behind a heavy one waits for the heavy one), and never less
than the time the backend has been busy without answering (`quiet_since`: a
backend that has just slowed down shows it before its first slow answer).
Both terms are learned from the worker's own answers, with no requests of
its own (capacity exploration, workers/probe.py, only chooses where a few
real requests go):

* `service[c]`: every successful answer of class c to a request sent to a
  free slot (in flight + 1 <= `slots`) moves the estimate by LEARN (an
  exponential average over the last twenty or so answers), an answer
  counting at most SERVICE_CAP times the estimate; the first answer
  of a class is taken whole.  (An answer that slow most likely queued: the
  slot count was read too high, and requests "sent to a free slot" waited
  behind heavy ones.  Counted whole, a few of them raised a backend's light
  service time from 2 to 26 ms in evaluation fleet 46, and it lost the
  light requests it served fastest; a backend that does slow down is
  `pace`'s to follow, below.)  In an instance curve (`instance=True`, the
  admin's, whose in-flight counts are the whole instance's and exact), only
  answers to requests that found the backend free (nothing else in flight,
  or only requests the backend had let go, as the admin judges: `alone`):
  those never queued, whatever the slot count, so a count read too high
  cannot raise the service time that would confirm it; and by
  INSTANCE_LEARN, as capacity
  needs a steadier figure than the pick (in the simulator, development
  fleets: 0.02 read the backends' capacities 5% off on average with two
  workers, 0.05 7%);
* `log_service[c]` and `spread`, for capacity (lb/capacity.py), not for the
  pick, and only in an instance curve: the same
  answers' log latency, averaged with each answer's distance from the
  average clipped at CLIP standard deviations (an answer that queued pulls
  it up by little), and the spread of the service time (the standard
  deviation of log latency around it, corrected for the clipping), shared by
  the classes;
* `slots`: the answers' latency relative to `service` is averaged by the
  in-flight count each request was sent at (LEVELS levels, one per count up
  to 7 and wider above, decayed with a time constant of TAU seconds), and so
  is `mix`, the mean service of the requests in flight when it was sent (by
  their classes, at the service times of the moment: `flying` counts them)
  over its own; `fit` picks, from SLOT_GRID, the slot count whose curve
  1 + rounds(n + 1 - slots) / slots x mix at each level's mean count and mix
  is closest to those averages in log terms, where a request with q others
  ahead of it for a slot waits FIRST_ROUND of a service for the first (the
  rest of a service in progress) and a whole one for each further one:
  rounds(q) = q x FIRST_ROUND up to one, q - 1 + FIRST_ROUND beyond.  (With
  one class, mix is 1.  Without it, a light request queued
  behind heavy ones reads as a backend serving fewer requests at once: on a
  fleet whose backends each draw their own mix of classes, a deep queue made
  one look half its size, and the pick kept off it while its slots idled.)  A
  backend never seen queueing keeps a low estimate until its answers show it
  serves more at once (the prior is one slot: no herd on a backend whose
  capacity is unknown).  `measured` is the same fit for capacity and for
  the capacity exploration (workers/probe.py), except that a count the
  answers cannot tell from the best fit stays: a backend gone quiet keeps
  the count measured at its last knee there, while `slots`, which the pick
  reads, falls back towards the prior as the evidence decays.

* `pace` (a worker's curves only): how much slower than its curve the
  backend answers now.  Every successful answer is compared with what the
  curve expects at the load it was sent at, service[c] x (1 + max(0, n + 1 -
  slots) / slots x mix), and `log_pace` averages the log of that ratio with weight
  PACE_LEARN (the last five answers or so); `pace` = exp(log_pace), never
  below 1, multiplies the expected latency.  The service time only learns
  from answers sent to a free slot, and the slot fit over a second: without
  `pace`, a backend that slows down while it is busy keeps its old service
  time (its answers all queued) and keeps drawing requests until the slot
  fit reads the slowdown as fewer slots.  As `service` and `slots` catch up,
  answers meet the curve again and `pace` falls back to 1.  It never lowers
  a price (the pick's scan relies on the service time giving a lower bound),
  and `log_pace` stops at PACE_FLOOR, so that a run of answers faster than
  the curve cannot hide the next slowdown for long.

The unit of `slots` is the in-flight requests of whoever feeds the curve: a
worker's own (with several workers, or several lb instances, sharing a
backend, each learns the share of it that it gets, since the others' load
shows in its latencies), or the whole instance's in the admin's curves.

Failed answers teach nothing here (a fast 503 is not a fast backend): the
strategy penalises failures separately.

`ChunkedFit` spreads the refits of a strategy's curves over its tables, a
chunk of backends per table.
"""

from __future__ import annotations

import math
from operator import mul

import numpy as np

DEFAULT_SERVICE = 0.005  # seconds: a request's expected service before any answer
# In-flight counts are grouped in LEVELS levels, one per count up to 7, then
# wider ones (8-9, 10-11, 12-15, 16-19, 20-27, 28-39, 40-63, 64 and more).
_EDGES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 28, 40, 64)
LEVELS = len(_EDGES)
LEVEL_OF = [max(i for i, e in enumerate(_EDGES) if e <= n) for n in range(_EDGES[-1])]
TOP = LEVELS - 1
LEARN = 0.05  # weight of one answer in the service-time estimate
SERVICE_CAP = 3.0  # ... in which one answer counts at most this many times the estimate (a worker's curves)
INSTANCE_LEARN = 0.02  # ... in an instance curve (the admin's, for capacity: fifty answers or so)
CLIP = 2.0  # standard deviations at which an answer's log distance is clipped (capacity statistics)
# E[min(z^2, CLIP^2)] for a standard normal z: what clipping leaves of a variance
_CLIPPED_VAR = math.erf(CLIP / math.sqrt(2)) - CLIP * math.sqrt(2 / math.pi) * math.exp(-CLIP * CLIP / 2) + \
    CLIP * CLIP * math.erfc(CLIP / math.sqrt(2))
PACE_LEARN = 0.2  # weight of one answer in `log_pace` (a worker's curves)
PACE_FLOOR = -0.5  # ... which goes no lower (a run of fast answers cannot hide a slowdown for long)
TAU = 1.0  # seconds: time constant of the per-level averages
# The share of a whole service a request sent to a busy backend waits, on
# average, for the request in service ahead of it: the rest of that service
# (half of it for a request sent at a random moment of a steady service, a
# little more for variable ones).  The slot fit counts the first round of
# waiting so; the pick's expected latency (`expected`) still counts it whole.
FIRST_ROUND = 0.5
MIN_LEVEL_ANSWERS = 2.0  # (decayed) answers at a level before it counts in the fit
MIN_FIT_ANSWERS = 5.0  # ... and in all levels before the slot count is refitted
SLOT_GRID = np.array([1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64,
                      80, 96, 112, 128], dtype=np.float64)


class Curve:
    """One backend's curve in one worker (see the module docstring)."""

    __slots__ = ("service", "slots", "measured", "top", "seen", "level_n", "level_sum", "level_load",
                 "level_mix", "work", "flying", "quiet_since", "log_service", "log_var", "instance",
                 "taught", "log_pace", "pace")

    def __init__(self, n_classes: int, instance: bool = False) -> None:
        self.instance = instance  # the admin's (see the module docstring)
        self.taught = [1] * n_classes  # answers that taught service[c] (instance curves)
        self.service = [0.0] * n_classes  # seconds; 0: no answer of that class yet
        self.log_service = [0.0] * n_classes  # mean ln seconds (robust), where service is set
        self.log_var = 0.0  # clipped variance of ln latency around log_service (see spread())
        self.slots = 1.0
        self.measured = 1.0  # the slot count for capacity: the last one the answers showed (see fit)
        self.top = 0.0  # evidence() as of the last fit (reported with the stats at no cost)
        self.work = 0.0  # expected service seconds of this worker's requests in flight here
        self.flying = [0] * n_classes  # ... and how many of each class
        self.quiet_since = -1.0  # the last answer, or the start of the busy period if later (-1: never)
        self.seen = 0.0  # monotonic time of the last answer learned from, or failure (Backend.record)
        self.level_n = [0.0] * LEVELS  # decayed answers sent at each in-flight level
        self.level_sum = [0.0] * LEVELS  # ... the sum of their latency / service
        self.level_load = [0.0] * LEVELS  # ... and of the in-flight counts they were sent at
        self.level_mix = [0.0] * LEVELS  # ... and of their `mix` (a worker's curves)
        self.log_pace = 0.0  # average ln(latency / what the curve expected), recent answers
        self.pace = 1.0  # exp(log_pace), at least 1: how much slower the backend answers than its curve

    def learn(self, cls: int, latency: float, load: int, now: float, alone: bool | None = None,
              mix: float = 1.0) -> None:
        """A successful answer of class `cls` after `latency` seconds, to a
        request sent while `load` others were in flight (from this worker, or
        from the instance in the admin's curves).  `alone` (instance curves):
        whether the request found the backend free, which the admin judges
        (default: nothing else in flight).  `mix` (a worker's curves): the
        mean expected service of the requests in flight when it was sent,
        over its own (`start` returns it)."""
        s = self.service[cls]
        if s > 0.0:
            if not self.instance:
                # pace: this answer against what the curve expected of it
                k = self.slots
                base = s + (load + 1 - k) / k * s * mix if load + 1 > k else s
                lp = self.log_pace
                lp += PACE_LEARN * (math.log(latency / base if latency > 1e-6 else 1e-6 / base) - lp)
                self.log_pace = lp if lp > PACE_FLOOR else PACE_FLOOR
                self.pace = math.exp(lp) if lp > 0.0 else 1.0
            lvl = LEVEL_OF[load] if load < 64 else TOP
            self.level_n[lvl] += 1.0
            self.level_sum[lvl] += latency / s
            self.level_load[lvl] += load
            if not self.instance:
                self.level_mix[lvl] += mix
            if (load == 0 if alone is None else alone) if self.instance else (load + 1 <= self.slots):
                # sent to a free slot: its latency is the service time.  (Answers
                # that may have queued are left out: de-queueing them by a slot
                # count that is too low would shrink the service time, which would
                # make queueing look worse, which would lower the slot count.)
                if not self.instance:
                    cap = SERVICE_CAP * s
                    self.service[cls] = s + LEARN * ((latency if latency < cap else cap) - s)
                else:
                    # (a plain mean of the first answers, then INSTANCE_LEARN)
                    k = self.taught[cls] = self.taught[cls] + 1
                    rate = 1.0 / k if k * INSTANCE_LEARN < 1.0 else INSTANCE_LEARN
                    self.service[cls] = s + rate * (latency - s)
                    d = math.log(latency if latency > 1e-6 else 1e-6) - self.log_service[cls]
                    v = self.log_var
                    lim = CLIP * math.sqrt(v) if v > 1e-4 else 0.5  # (before the spread is known: 0.5)
                    d = lim if d > lim else (-lim if d < -lim else d)
                    self.log_service[cls] += rate * d
                    self.log_var = v + rate * (d * d - v)
        else:
            # the first answer, taken whole: it may have queued, and a service
            # time too high is corrected by the next answers sent to a free slot,
            # while one too low would draw the class's requests here meanwhile
            self.service[cls] = latency
            self.log_service[cls] = math.log(latency if latency > 1e-6 else 1e-6)
        self.seen = self.quiet_since = now

    def start(self, cls: int, load: int, now: float) -> tuple[float, float]:
        """A request of class `cls` is sent while `load` others are in flight:
        its expected service joins `work`, and it counts in `flying`.
        Returns that service (what the caller gives back with `done`) and
        the request's `mix` (for `learn`): the mean service of the requests
        in flight, by their classes at the curve's current service times,
        over its own; 1 with none, or with one class (a service time that
        changes while requests are in flight is no mix of classes)."""
        sv = self.service
        s = sv[cls] or max(sv) or DEFAULT_SERVICE
        self.work += s
        fl = self.flying
        mix = 1.0
        if not load:
            self.quiet_since = now  # a busy period begins
        elif len(fl) > 1:
            ahead = sum(map(mul, fl, sv))
            if ahead > 0.0 and sv[cls]:
                mix = ahead / (load * s)
        fl[cls] += 1
        return s, mix

    def spread(self) -> float:
        """The service time's spread: the standard deviation of its log (0: not
        known yet), the clipping's shrinkage undone."""
        return math.sqrt(self.log_var / _CLIPPED_VAR)

    def evidence(self) -> float:
        """The in-flight count (+1) up to which recent answers show how the
        backend behaves: slots at or above it are a lower bound, not a fit."""
        top = 0.0
        for n, load in zip(self.level_n, self.level_load):
            if n >= MIN_LEVEL_ANSWERS:
                top = max(top, load / n + 1.0)
        return top

    def done(self, cls: int, work: float, inflight: int) -> None:
        """A request of class `cls` sent with `start` no longer occupies the
        backend (`work`: what `start` returned; `inflight`: the requests
        still in flight there)."""
        if inflight > 0:
            self.work -= work
            self.flying[cls] -= 1
        else:
            self.work = 0.0
            self.flying = [0] * len(self.flying)

    def expected(self, cls: int, inflight: int, service: float, now: float) -> float:
        """Expected seconds for one more request of class `cls` while
        `inflight` are in flight: its service, plus, when every slot is taken,
        the wait for (inflight + 1 - slots) / slots of the requests ahead, at the
        mean expected service of those in flight; both times `pace`.  And
        never less than the time the backend has been busy without answering
        (with slots full: never less than its service plus that time): a
        backend that has just slowed down, or is stuck on work of unknown
        cost, is seen before its first slow answer.  `service`: the price of a
        class not answered yet."""
        pace = self.pace
        s = (self.service[cls] or service) * pace
        if not inflight:
            return s
        quiet = now - self.quiet_since if self.quiet_since >= 0.0 else 0.0
        k = self.slots
        if inflight + 1 > k:
            wait = (inflight + 1 - k) / k * self.work / inflight * pace
            return s + (wait if wait > quiet else quiet)
        return s if s > quiet else quiet

    def externality(self, cls: int, inflight: int, service: float) -> float:
        """The wait one more request of class `cls` adds to the requests that
        queue behind it when it has to queue (in flight + 1 > `slots`): one
        `slots`-th of its service each, for as many as are queued now (the
        queue it joins is the best guess of the queue it leaves behind).
        Its expected latency plus this is its marginal cost at the backend:
        a heavy request priced so keeps off a busy backend that serves it
        slowly in favour of one that spends less capacity on it, where its
        own latency alone would not tell them apart."""
        queued = inflight + 1 - self.slots
        if queued <= 0:
            return 0.0
        return (self.service[cls] or service) * self.pace / self.slots * queued


def fit(curves: list[Curve], dt: float) -> None:
    """Refit every curve's slot count from its per-level averages, then decay
    them by `dt` seconds.  Vectorised: a few hundred microseconds for 256
    backends (bench/inference_bench.py).  The model is 1 + rounds(n + 1 - k)
    / k x mix at n in flight (the module docstring): a request queued behind
    the only one in flight waits the rest of that one's service, half of it
    on average (FIRST_ROUND).  Counted as a whole service, the answers of a
    single-slot backend at one in flight (about 1 + mix / 2) sat between the
    curves of one slot (1 + mix) and of 1.5 (1 + mix / 3), and the fit often
    read 1.5: the pick then sent requests to a busy backend as to a free half
    slot (tests/unit/test_loadcurve.py; docs/learning.md)."""
    if not curves:
        return
    n = np.array([c.level_n for c in curves], dtype=np.float64)  # (B, LEVELS)
    total = np.array([c.level_sum for c in curves], dtype=np.float64)
    loads = np.array([c.level_load for c in curves], dtype=np.float64)
    mixes = np.array([c.level_mix for c in curves], dtype=np.float64)
    use = n >= MIN_LEVEL_ANSWERS
    # only the levels in use weigh in the fit: (a backend rarely has more than a few)
    at_b, at_l = np.nonzero(use)  # (row-major: each backend's levels together)
    nu = n[at_b, at_l]
    mean = np.log(total[at_b, at_l] / nu)
    # ln(1 + rounds(load + 1 - k) / k x mix) at each level's mean load and mix, for
    # every grid value: (levels in use, K)
    grid = SLOT_GRID
    k = grid[None, :]
    queued = np.maximum(0.0, (loads[at_b, at_l] / nu + 1.0)[:, None] - k)
    queued = (queued - (1.0 - FIRST_ROUND) * np.minimum(queued, 1.0)) / k
    curve = np.log1p(queued * (mixes[at_b, at_l] / nu)[:, None])
    # squared log error of every grid value, weighted by answers, summed per backend: (B, K)
    sq = nu[:, None] * (mean[:, None] - curve) ** 2
    err = np.zeros((len(curves), len(grid)))
    if len(at_b):
        first = np.flatnonzero(np.r_[True, at_b[1:] != at_b[:-1]])
        err[at_b[first]] = np.add.reduceat(sq, first, axis=0)
    best = grid[err.argmin(axis=1)]
    # For `measured`, a count the answers cannot tell from the best stays:
    # answers that only show the backend below its knee fit every count above
    # their load equally well, and the last measured count is the one to keep
    # (the grid's lowest, which the pick takes, forgets a knee as soon as its
    # evidence decays).
    was = np.array([c.measured for c in curves], dtype=np.float64)
    at = np.searchsorted(grid, was).clip(0, len(grid) - 1)
    same = (grid[at] == was) & (err[np.arange(len(curves)), at] <= err.min(axis=1) + 1e-12)
    kept = np.where(same, was, best)
    enough = np.where(use, n, 0.0).sum(axis=1) >= MIN_FIT_ANSWERS
    top = np.where(use, loads / np.maximum(n, 1e-12) + 1.0, 0.0).max(axis=1)  # evidence(), for every curve at once
    keep = math.exp(-dt / TAU)
    n *= keep
    total *= keep
    loads *= keep
    mixes *= keep
    # (Python values in one conversion each, not element by element)
    for c, e, b, m, t, ln, ls, ll, lm in zip(curves, enough.tolist(), best.tolist(), kept.tolist(), top.tolist(),
                                            n.tolist(), total.tolist(), loads.tolist(), mixes.tolist()):
        if e:
            c.slots = b
            c.measured = m
        c.top = t
        c.level_n = ln
        c.level_sum = ls
        c.level_load = ll
        c.level_mix = lm


class ChunkedFit:
    """Refits a strategy's curves `chunk` at a time, the next chunk per call
    (every table): all of them within a few tables, since the curves average
    over a second anyway, and no table install pays for a whole large fleet."""

    __slots__ = ("chunk", "next", "fitted_at", "last")

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.next = 0  # the chunk the next call fits
        self.fitted_at: dict[int, float] = {}  # clock time each chunk was last fitted
        self.last = 0.0  # clock time of the last fit (of any chunk)

    def step(self, curves: list[Curve], now: float) -> None:
        n = len(curves)
        if not n:
            return
        k = self.next
        lo = k * self.chunk
        if lo >= n:
            k, lo = 0, 0
        last = self.fitted_at.get(k, 0.0)
        if last:
            fit(curves[lo:lo + self.chunk], now - last)
        self.fitted_at[k] = now
        self.next = k + 1
        self.last = now
