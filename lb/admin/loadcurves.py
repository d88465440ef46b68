"""Each backend's load curve as the whole instance loads it, for capacity.

A worker's own load curve (workers/loadcurve.py) counts only its own requests
in flight; the other workers' show in its latencies as a backend slower than
it is, and a worker cannot tell a fraction of a slot.  Here the admin puts
every worker's answers together: each stats report carries, per backend, the
response heads since the last one, with when each request was sent and how
long it took (`BackendStats.sends`; the request path only appends three
numbers per answer, workers/backend.py).  All the workers' clocks are the
host's monotonic clock, so the requests the instance had in flight at a
backend when one of them was sent is a count over those intervals.

`fold`, once a second, learns from the requests sent up to LAG seconds ago
(by then every request in flight with them has answered and been reported,
unless it took longer than LAG).  Each answer, with the instance's in-flight
count at its send time, goes into the backend's `Curve`
(workers/loadcurve.py, `instance=True`): the service time per class, its
spread, and the in-flight levels the answers show (the evidence).  The slot
count is fitted here, not from the levels' mean latencies: for every whole
count k, each answer is compared with what a first-come-first-served backend
of k slots would have made it take, its service (the class's median) plus
the wait until the k-th latest end among the requests it found in flight,
those ends being known too, less the time lb goes on counting a request
after the backend has let it go (its event loop reading the answer, the
backend's writing it: milliseconds on a busy host), which is fitted with the
count from LAGS.  The count whose predictions erred least (squared log
error, averaged over TAU seconds) is the backend's, or rather the lowest of
the counts that fit within SURE times the service's log variance of it (the
count read before stays while it still fits best: a backend gone quiet keeps
its count); it is measured (`knee_at`) when it is the only one and answers
were seen at that load or above (otherwise the capacity is a lower bound).
Predicting from the actual ends, not from a mean residual service, makes the
fit indifferent to how the requests arrive (evenly spaced, in bursts or at
random).  The service time is learned from the answers to requests that
found the backend free: nothing in flight, or only requests that ended
within the fitted lag.  5xx answers count in flight but teach nothing.  A
backend whose answers were not all kept (`sends_lost`, a very busy worker)
learns nothing from the interval that lacks them.

The errors average over TAU seconds, where a worker's pick averages over one
(it must follow a backend that slows down; capacity needs the answers of
rare loads, and a backend's slots change slowly).  Chosen in the simulator
on the development fleets `steady1000`-`steady1015` (39 backends; 45% load;
two workers, then eight), with the earlier fit from the levels' means: with
1 s, the backends' capacities were 11% and 17% off on average and 36 and 33
of them within 20%; with 20 s, 7% and 11% off, 39 and 37 within 20% (10 s
and 30 s were close to 20 s).  With this fit, two workers, no exploration,
the capacities were 6.8% off on average at 45% load, 8.0% at 30% (the
levels' fit: 15%) and 3.8% at 60% (5.5%), with 33, 27 and 37 backends
measured and none of them wrong; taking the best count whatever the margin
(no SURE) gave 4.3%, 7.3% and 3.8%, but 36 and 31 measured at 45% and 30%,
one and two of them wrong.
"""

from __future__ import annotations

import math
import time

import numpy as np

from workers.loadcurve import MIN_FIT_ANSWERS, SLOT_GRID, Curve

LAG = 2.0  # seconds between a request's send and its learning (the longest request fully counted)
GRID = SLOT_GRID[SLOT_GRID == np.floor(SLOT_GRID)]  # whole slot counts: the backend's, not a share
TAU = 20.0  # seconds: time constant of the slot counts' errors (a worker's pick: 1 s)
LAGS = np.array([0.0, 0.001, 0.002, 0.004, 0.008])  # seconds lb may count a request the backend let go
SURE = 4.0  # how much worse (squared log error, in service variances) a count must fit to be ruled out
MIN_VAR = 0.01  # ... the variance taken when the service's spread is smaller (or not known yet)
FIT_SAMPLE = 512  # answers per backend and second that the slot fit replays, at most
WINDOW = 64  # sends before an answer searched for the requests it found in flight


class InstanceCurves:
    """The backends' load curves from every worker's answers (see the module docstring)."""

    def __init__(self, lag: float = LAG) -> None:
        self.lag = lag
        self.classes: list[str] = []
        self.generation = -1  # the newest workers' generation heard of
        self.curves: dict[str, Curve] = {}
        self.knee_at: dict[str, float] = {}  # monotonic time a fit last saw the backend queue
        self._err: dict[str, np.ndarray] = {}  # backend -> decayed squared log error, (LAGS, GRID)
        self._weight: dict[str, float] = {}  # ... and the decayed answers in it
        self.lag_of: dict[str, float] = {}  # backend -> seconds lb counts a request after it left (fitted)
        self._new: dict[str, list[bytes]] = {}  # reports' records not folded yet
        self._held: dict[str, np.ndarray] = {}  # (N, 3) records that may still be in flight at a later send
        self._lost: dict[str, float] = {}  # backend -> monotonic time of a report that left some out
        self._rng = np.random.default_rng(0)
        self._horizon = -math.inf  # requests sent up to here are learned
        self._folded = 0.0  # monotonic time of the last fold

    def offer(self, ws, now: float | None = None) -> None:
        """One worker's stats report (a `WorkerStats`), received at monotonic `now`."""
        if ws.generation > self.generation:
            self.generation = ws.generation
            if ws.classes != self.classes:  # a new configuration's classes: start over
                self.classes = list(ws.classes)
                for d in (self.curves, self._held, self._new, self._err, self._weight, self.lag_of):
                    d.clear()
        elif ws.classes != self.classes:
            return  # a worker of an older generation, draining: its class numbers are not these
        for b in ws.backends:
            if b.sends:
                self._new.setdefault(b.name, []).append(b.sends)
            if b.sends_lost:
                self._lost[b.name] = time.monotonic() if now is None else now

    def forget(self, keep: set[str]) -> None:
        """Drop the backends not in `keep` (removed from the fleet)."""
        for d in (self.curves, self.knee_at, self._new, self._held, self._lost, self._err, self._weight,
                  self.lag_of):
            for name in [n for n in d if n not in keep]:
                del d[name]

    def fold(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        horizon = now - self.lag
        low = self._horizon
        for name in set(self._new) | set(self._held):
            parts = [np.frombuffer(p, dtype=np.float64).reshape(-1, 3) for p in self._new.pop(name, ())]
            held = self._held.get(name)
            if held is not None:
                parts.append(held)
            rec = np.concatenate(parts) if len(parts) > 1 else parts[0]
            rec = rec[np.argsort(rec[:, 1], kind="stable")]
            start, took = rec[:, 1], rec[:, 2]
            end = start + took
            lost = self._lost.get(name, -math.inf)
            learn = (start > low) & (start <= horizon)
            if learn.any() and lost < low - self.lag:
                self._learn(name, rec, start, end, np.nonzero(learn)[0])
            self._held[name] = rec[end > horizon]
        if self._folded:
            self._fit(now, now - self._folded)
        self._horizon = horizon
        self._folded = now

    def _learn(self, name: str, rec: np.ndarray, start: np.ndarray, end: np.ndarray, idx: np.ndarray) -> None:
        """The answers at `idx` (records sorted by send time): into the
        backend's curve, and into the error of every slot count's prediction."""
        curve = self.curves.get(name)
        if curve is None:
            curve = self.curves[name] = Curve(max(1, len(self.classes)), instance=True)
            self._err[name] = np.zeros((len(LAGS), len(GRID)))
            self._weight[name] = 0.0
            self.lag_of[name] = 0.0
        at = start[idx]
        # in flight at each send: sent before it, minus those answered by then
        inflight = np.maximum(np.searchsorted(start, at, "left") - np.searchsorted(np.sort(end), at, "right"), 0)
        # What each answer would have taken with k slots, first come first
        # served: the service, plus the wait until k of the requests ahead
        # have gone, i.e. until the k-th latest end among those in flight
        # (the ones sent within WINDOW sends before it; an answer with any in
        # flight from earlier is left out), less the time lb counts a request
        # in flight after the backend has let it go (LAGS, fitted too).
        width = int(min(WINDOW, inflight.max()))
        counts = int(np.searchsorted(GRID, width, "right"))  # GRID[:counts] can make an answer wait
        wait = np.zeros((len(idx), counts + 1))  # (the last column: every count above `width`)
        whole = np.ones(len(idx), dtype=bool)
        if width:
            back = idx[:, None] - np.arange(1, width + 1)[None, :]  # (N, width) the sends before each
            valid = back >= 0
            back = np.maximum(back, 0)
            ahead = valid & (start[back] < at[:, None]) & (end[back] > at[:, None])
            whole = ahead.sum(axis=1) == inflight
            ends = -np.sort(-np.where(ahead, end[back], -np.inf), axis=1)  # latest first
            wait[:, :counts] = ends[:, GRID[:counts].astype(np.intp) - 1] - at[:, None]
        # Its service time is learned from the answers that found the backend
        # free: nothing in flight, or only requests lb still counted after the
        # backend let them go (ended within the fitted lag).
        alone = whole & (wait[:, 0] <= self.lag_of[name])
        cls = rec[idx, 0]
        n_classes = len(curve.service)
        for c, took, load, done, free in zip(cls.tolist(), rec[idx, 2].tolist(), inflight.tolist(),
                                             end[idx].tolist(), alone.tolist()):
            if 0 <= c < n_classes:  # (a 5xx is -1 - class: in flight, not a service time)
                curve.learn(int(c), took, load, done, free)
        median = np.array([math.exp(m) if s > 0 else 0.0 for s, m in zip(curve.service, curve.log_service)])
        ok = whole & (cls >= 0) & (cls < n_classes)
        ok[ok] = median[cls[ok].astype(np.intp)] > 0
        rows = np.nonzero(ok)[0]
        if not len(rows):
            return
        if len(rows) > FIT_SAMPLE:  # plenty: the errors of a random sample, scaled up
            rows = self._rng.choice(rows, FIT_SAMPLE, replace=False)
        service = median[cls[rows].astype(np.intp)][:, None, None]
        predicted = service + np.maximum(wait[rows][:, None, :] - LAGS[None, :, None], 0.0)  # (N, LAGS, counts+1)
        err = (np.log(np.maximum(rec[idx[rows], 2], 1e-6))[:, None, None] - np.log(predicted)) ** 2
        err = err.sum(axis=0) * (ok.sum() / len(rows))
        self._err[name][:, :counts] += err[:, :counts]
        self._err[name][:, counts:] += err[:, counts:]
        self._weight[name] += int(ok.sum())

    def _fit(self, now: float, dt: float) -> None:
        """Each backend's slot count from its predictions' errors (below),
        and whether it is measured; then the evidence decays by `dt` seconds."""
        keep = math.exp(-dt / TAU)
        for name, c in self.curves.items():
            err = self._err[name]
            if self._weight[name] >= MIN_FIT_ANSWERS:
                per_count = err.min(axis=0)  # each count at the lag that fits it best
                # The counts the answers cannot tell from the best: within SURE
                # service variances of its squared log error (a few slow answers
                # at a rare load are no knee).  The count kept is the last one
                # if it is still the best (a backend gone quiet keeps its
                # count), else the lowest of them (a lower bound: an estimate
                # too high is the costly error); it is measured only if the
                # answers single it out.
                low = per_count.min()
                inside = per_count <= low + SURE * max(c.spread() ** 2, MIN_VAR)
                at = int(np.searchsorted(GRID, c.measured))  # (always one of GRID: 1, or set below)
                if per_count[at] > low + 1e-12 * max(low, 1.0):
                    at = int(inside.argmax())
                    c.measured = float(GRID[at])
                self.lag_of[name] = float(LAGS[int(err[:, at].argmin())])
                sure = int(inside.sum()) == 1
            else:
                sure = False
            c.top = c.evidence()
            if sure and c.top > c.measured + 0.5:  # answers above the fitted count: the knee shows
                self.knee_at[name] = now
            err *= keep
            self._weight[name] *= keep
            c.level_n = [v * keep for v in c.level_n]
            c.level_sum = [v * keep for v in c.level_sum]
            c.level_load = [v * keep for v in c.level_load]

    def summary(self, name: str) -> tuple[float, list[float], float, float] | None:
        """(slots, service seconds per class (0: none yet), spread, evidence) of
        a backend, or None before its first answer."""
        c = self.curves.get(name)
        if c is None or not any(c.service):
            return None
        sigma = c.spread()
        service = [math.exp(mu + sigma * sigma / 2) if s > 0 and sigma > 0 else s
                   for s, mu in zip(c.service, c.log_service)]
        return c.measured, service, sigma, c.top
