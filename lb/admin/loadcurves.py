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
unless it took longer than LAG): each answer with the instance's in-flight
count at its send time goes into the backend's `Curve`, exactly as a worker's
own answers go into its curve; then the curves are refitted over whole slot
counts (the count is the backend's, not a worker's share), with the queueing
behind one request in progress priced at its mean residual service (see
`workers.loadcurve.fit`).  5xx answers count in flight but teach nothing.  A
backend whose answers were not all kept (`sends_lost`, a very busy worker)
learns nothing from the interval that lacks them.

The curves average over TAU seconds, where a worker's pick averages over one
(it must follow a backend that slows down; capacity needs the answers of
rare loads, and a backend's slots change slowly).  Chosen in the simulator
on the development fleets `steady1000`-`steady1015` (39 backends; 45% load;
two workers, then eight): with 1 s, the backends' capacities were 11% and
17% off on average and 36 and 33 of them within 20%; with 20 s, 7% and 11%
off, 39 and 37 within 20% (10 s and 30 s were close to 20 s).
"""

from __future__ import annotations

import math
import time

import numpy as np

from workers.loadcurve import SLOT_GRID, Curve, fit

LAG = 2.0  # seconds between a request's send and its learning (the longest request fully counted)
GRID = SLOT_GRID[SLOT_GRID == np.floor(SLOT_GRID)]  # whole slot counts: the backend's, not a share
TAU = 20.0  # seconds: time constant of the per-level averages (a worker's pick: 1 s)


class InstanceCurves:
    """The backends' load curves from every worker's answers (see the module docstring)."""

    def __init__(self, lag: float = LAG) -> None:
        self.lag = lag
        self.classes: list[str] = []
        self.generation = -1  # the newest workers' generation heard of
        self.curves: dict[str, Curve] = {}
        self.knee_at: dict[str, float] = {}  # monotonic time a fit last saw the backend queue
        self._new: dict[str, list[bytes]] = {}  # reports' records not folded yet
        self._held: dict[str, np.ndarray] = {}  # (N, 3) records that may still be in flight at a later send
        self._lost: dict[str, float] = {}  # backend -> monotonic time of a report that left some out
        self._horizon = -math.inf  # requests sent up to here are learned
        self._folded = 0.0  # monotonic time of the last fold

    def offer(self, ws, now: float | None = None) -> None:
        """One worker's stats report (a `WorkerStats`), received at monotonic `now`."""
        if ws.generation > self.generation:
            self.generation = ws.generation
            if ws.classes != self.classes:  # a new configuration's classes: start over
                self.classes = list(ws.classes)
                self.curves.clear()
                self._held.clear()
                self._new.clear()
        elif ws.classes != self.classes:
            return  # a worker of an older generation, draining: its class numbers are not these
        for b in ws.backends:
            if b.sends:
                self._new.setdefault(b.name, []).append(b.sends)
            if b.sends_lost:
                self._lost[b.name] = time.monotonic() if now is None else now

    def forget(self, keep: set[str]) -> None:
        """Drop the backends not in `keep` (removed from the fleet)."""
        for d in (self.curves, self.knee_at, self._new, self._held, self._lost):
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
            start, took = rec[:, 1], rec[:, 2]
            end = start + took
            lost = self._lost.get(name, -math.inf)
            learn = (start > low) & (start <= horizon)
            if learn.any() and lost < low - self.lag:
                self._learn(name, rec, start, end, learn)
            self._held[name] = rec[end > horizon]
        if self._folded and self.curves:
            names = list(self.curves)
            curves = [self.curves[n] for n in names]
            # the mean residual service of a request in progress, as a share of the mean: (1 + cv^2) / 2
            residual = np.array([math.exp(c.spread() ** 2) / 2 if c.log_var > 0 else 1.0 for c in curves])
            fit(curves, now - self._folded, residual, GRID, TAU)
            for n, c in zip(names, curves):
                if c.top > c.measured + 0.5:  # answers above the fitted count: the knee shows
                    self.knee_at[n] = now
        self._horizon = horizon
        self._folded = now

    def _learn(self, name: str, rec: np.ndarray, start: np.ndarray, end: np.ndarray, learn: np.ndarray) -> None:
        curve = self.curves.get(name)
        if curve is None:
            curve = self.curves[name] = Curve(max(1, len(self.classes)), instance=True)
        idx = np.nonzero(learn)[0]
        idx = idx[np.argsort(start[idx], kind="stable")]
        at = start[idx]
        # in flight at each send: sent before it, minus those answered by then
        inflight = np.searchsorted(np.sort(start), at, "left") - np.searchsorted(np.sort(end), at, "right")
        n_classes = len(curve.service)
        for cls, took, load, done in zip(rec[idx, 0].tolist(), rec[idx, 2].tolist(),
                                         np.maximum(inflight, 0).tolist(), end[idx].tolist()):
            if 0 <= cls < n_classes:  # (a 5xx is -1 - class: in flight, not a service time)
                curve.learn(int(cls), took, load, done)

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
