"""Backends as a worker sees them, and the strategies that pick one per request.

Every strategy answers `pick(exclude)` with a `Backend` (or None when nothing
is eligible) from state the worker holds locally: no I/O, no allocation on the
common path.  Each response head is recorded with one call,
`Backend.record(cls, rtt, error, now)`, which also feeds the peak-EWMA
estimate that `Strategy.observe()` maintains.

The learned policy (`ml`, workers/learned.py) and Prequal (workers/prequal.py)
live in their own modules; workers/strategies.py maps names to classes.
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right
from itertools import accumulate
from math import exp

from lb.config import Backend as BackendConfig
from lb.messages import LATENCY_BOUNDS, N_BUCKETS
from workers.strategy import Strategy

DEFAULT_RTT = 0.005  # seconds; the prior for a backend that has not answered yet


class Backend:
    __slots__ = (
        "name",
        "host",
        "port",
        "weight",
        "pool",
        "inflight",
        "ewma",
        "ewma_ts",
        "tau",
        "cw",
        "available",
        # counters, shipped to the supervisor with the periodic stats
        "requests",
        "responses",
        "connect_errors",
        "timeouts",
        "retries",
        "resets",
        # per request class (index = class), reported with the stats
        "idx",
        "cls_responses",
        "cls_errors",
        "cls_lat_sum",
        "cls_hist",
        "tracer",
        # health and protection (workers/health.py, workers/dispatch.py)
        "failures",
        "eject_after",
        "on_outlier",
        "ejections",
        "ramp",
        "max_conns",
        "max_pending",
        "connecting",
        "overflows",
        # ml: this worker's load curve of the backend (workers/loadcurve.py), or None
        "curve",
    )

    def __init__(self, cfg: BackendConfig, n_classes: int = 1, idx: int = 0) -> None:
        host, _, port = cfg.address.rpartition(":")
        self.name = cfg.name
        self.host = host.strip("[]")
        self.port = int(port)
        self.weight = cfg.weight
        self.pool = None  # set by the worker
        self.inflight = 0
        self.ewma = DEFAULT_RTT
        self.ewma_ts = 0.0
        self.tau = 10.0  # peak-EWMA decay (seconds), set by the strategy
        self.cw = 0  # smooth weighted round robin state
        self.available = cfg.weight > 0
        self.requests = 0
        self.responses = [0, 0, 0, 0, 0, 0]  # by status class; [0] = no response
        self.connect_errors = 0
        self.timeouts = 0
        self.retries = 0
        self.resets = 0
        self.idx = idx
        self.cls_responses = [0] * n_classes
        self.cls_errors = [0] * n_classes
        self.cls_lat_sum = [0.0] * n_classes
        self.cls_hist = [[0] * N_BUCKETS for _ in range(n_classes)]
        self.tracer = None  # workers.telemetry.Tracer when traces are sampled
        self.failures = 0  # consecutive failed outcomes
        self.eject_after = 1 << 62
        self.on_outlier = None  # HealthState.eject
        self.ejections = 0
        self.ramp = 1.0  # slow start: share of picks kept (1 = full)
        self.max_conns = 1 << 62  # circuit breaking, this worker's share
        self.max_pending = 1 << 62
        self.connecting = 0  # new connections being opened for requests
        self.overflows = 0  # requests turned away by this backend's circuit breaker
        self.curve = None

    def observe(self, rtt: float, now: float) -> None:
        """Peak EWMA (as in Finagle/Linkerd): jump up at once, decay slowly."""
        ewma = self.ewma
        if rtt >= ewma:
            self.ewma = rtt
        else:
            w = exp((self.ewma_ts - now) / self.tau)
            self.ewma = ewma * w + rtt * (1.0 - w)
        self.ewma_ts = now

    def record(self, cls: int, latency: float, error: bool, now: float | None = None, load: int = -1) -> None:
        """One outcome of a request of class `cls` sent here: a response head
        after `latency` seconds (an error if 5xx), or a failure without one.
        With `now` (a response head arrived then) the peak EWMA is updated too,
        exactly as `observe(latency, now)` would: one call per response.
        `load`: the requests this worker had in flight here when it sent this
        one (-1: unknown), for the load curve (`ml` only)."""
        if now is not None:
            # observe(), inlined (tests/test_strategies.py checks they agree)
            ewma = self.ewma
            if latency >= ewma:
                self.ewma = latency
            else:
                w = exp((self.ewma_ts - now) / self.tau)
                self.ewma = ewma * w + latency * (1.0 - w)
            self.ewma_ts = now
        self.cls_responses[cls] += 1
        if error:
            self.cls_errors[cls] += 1
            self.failures += 1
            if self.failures >= self.eject_after:
                self.on_outlier(self)
        else:
            if self.failures:
                self.failures = 0
            if load >= 0 and self.curve is not None:
                self.curve.learn(cls, latency, load, now)
        self.cls_lat_sum[cls] += latency
        self.cls_hist[cls][bisect_left(LATENCY_BOUNDS, latency)] += 1
        t = self.tracer
        if t is not None:
            t.countdown -= 1
            if t.countdown <= 0:
                t.take(self.idx, cls, latency, not error, now)

    def __repr__(self) -> str:
        return f"<Backend {self.name} inflight={self.inflight} ewma={self.ewma * 1e3:.2f}ms>"


class RoundRobin(Strategy):
    name = "round_robin"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.i = 0

    def pick(self, exclude=(), cls=0):
        backends = self.backends
        n = len(backends)
        if not n:  # (a fleet from etcd can be empty)
            return None
        i = self.i
        b = backends[i % n]
        self.i = i + 1
        # the usual case first, without the loop
        if b.available and b not in exclude:
            return b
        for _ in range(n - 1):
            b = backends[self.i % n]
            self.i += 1
            if b.available and b not in exclude:
                return b
        return None


class WeightedRoundRobin(Strategy):
    """Smooth weighted round robin, as nginx does it: spreads picks evenly."""

    name = "weighted_round_robin"

    def pick(self, exclude=(), cls=0):
        best = None
        total = 0
        for b in self.backends:
            if not b.available or b in exclude:
                continue
            b.cw += b.weight
            total += b.weight
            if best is None or b.cw > best.cw:
                best = b
        if best is not None:
            best.cw -= total
        return best


class LeastConnections(Strategy):
    """Fewest in-flight requests relative to weight; ties rotate."""

    name = "least_connections"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.i = 0

    def pick(self, exclude=(), cls=0):
        backends = self.backends
        n = len(backends)
        if not n:
            return None
        self.i = start = (self.i + 1) % n
        best = None
        best_load = 0.0
        for k in range(n):
            b = backends[(start + k) % n]
            if not b.available or b in exclude:
                continue
            load = (b.inflight + 1) / b.weight
            if best is None or load < best_load:
                best = b
                best_load = load
        return best


class Random(Strategy):
    """Random, proportional to weight."""

    name = "random"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.refresh()

    def refresh(self) -> None:
        self._avail = [b for b in self.backends if b.available]
        self._cum = list(accumulate(b.weight for b in self._avail))

    def pick(self, exclude=(), cls=0):
        if exclude:
            cands = self.eligible(exclude)
            if not cands:
                return None
            return self.rng.choices(cands, [b.weight for b in cands])[0]
        if not self._cum:
            return None
        x = self.rng.random() * self._cum[-1]
        return self._avail[bisect_right(self._cum, x)]


class P2CEwma(Strategy):
    """Power of two choices over peak-EWMA latency x (in-flight + 1) / weight."""

    name = "p2c_ewma"

    def pick(self, exclude=(), cls=0):
        backends = self.backends
        n = len(backends)
        if n <= 1 or exclude:
            cands = self.eligible(exclude) if (exclude or n == 0 or not backends[0].available) else backends
            n = len(cands)
            if n == 0:
                return None
            if n == 1:
                return cands[0]
            backends = cands
        rnd = self.rng.random
        i = int(rnd() * n)
        j = int(rnd() * (n - 1))
        if j >= i:
            j += 1
        a = backends[i]
        b = backends[j]
        if not a.available:
            return b if b.available else self._fallback()
        if not b.available:
            return a
        ca = a.ewma * (a.inflight + 1) / a.weight
        cb = b.ewma * (b.inflight + 1) / b.weight
        return a if ca <= cb else b

    def _fallback(self):
        cands = self.eligible(())
        return self.rng.choice(cands) if cands else None
