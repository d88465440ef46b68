"""A backend as a worker sees it: address, pool, counters, peak EWMA, health and protection state.

The strategies (workers/classic.py, workers/prequal.py, workers/learned.py)
pick among these; each response head is recorded with one call,
`Backend.record(cls, rtt, error, now)`, which also feeds the peak-EWMA
estimate every strategy reads, and keeps when the request was sent and how
long it took (`sent`, shipped with the next stats report: the admin rebuilds
from every worker's what the whole instance had in flight at the backend,
lb/admin/loadcurves.py).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from math import exp

from lb.core.config import Backend as BackendConfig
from lb.core.messages import LATENCY_BOUNDS, N_BUCKETS

DEFAULT_RTT = 0.005  # seconds; the prior for a backend that has not answered yet
ERR_LEARN = 0.2  # weight of one outcome in `err` (the last five or so)
ERR_ZERO = 1e-3  # `err` below this is taken as 0
SENT_MAX = 8192  # answers kept per backend between two stats reports (more: `sent_lost`)


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
        "err",
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
        # answers since the last stats report: (class, or -1 - class for a 5xx; sent at; seconds),
        # None where nobody reads them (the simulator)
        "sent",
        "sent_lost",  # more than SENT_MAX of them: the rest were not kept
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
        self.err = 0.0  # recent share of failed outcomes (ml's guard charges its control arm by it)
        self.eject_after = 1 << 62
        self.on_outlier = None  # HealthState.eject
        self.ejections = 0
        self.ramp = 1.0  # slow start: share of picks kept (1 = full)
        self.max_conns = 1 << 62  # circuit breaking, this worker's share
        self.max_pending = 1 << 62
        self.connecting = 0  # new connections being opened for requests
        self.overflows = 0  # requests turned away by this backend's circuit breaker
        self.curve = None
        self.sent = array("d")
        self.sent_lost = False

    def observe(self, rtt: float, now: float) -> None:
        """Peak EWMA (as in Finagle/Linkerd): jump up at once, decay slowly."""
        ewma = self.ewma
        if rtt >= ewma:
            self.ewma = rtt
        else:
            w = exp((self.ewma_ts - now) / self.tau)
            self.ewma = ewma * w + rtt * (1.0 - w)
        self.ewma_ts = now

    def record(self, cls: int, latency: float, error: bool, now: float | None = None, load: int = -1,
               mix: float = 1.0) -> None:
        """One outcome of a request of class `cls` sent here: a response head
        after `latency` seconds (an error if 5xx), or a failure without one.
        With `now` (a response head arrived then) the peak EWMA is updated too,
        exactly as `observe(latency, now)` would: one call per response, except
        that an error may raise it but never lowers it (a backend that fails
        fast must not look fast and draw the traffic to its failures).
        `load`: the requests this worker had in flight here when it sent this
        one (-1: unknown), and `mix`, how heavy those were against it
        (`Curve.start`), for the load curve (`ml` only).  With `now`, the
        answer joins `sent` too."""
        if now is not None and (not error or latency >= self.ewma):
            # observe(), inlined (tests/process/test_strategies.py checks they agree)
            ewma = self.ewma
            if latency >= ewma:
                self.ewma = latency
            else:
                w = exp((self.ewma_ts - now) / self.tau)
                self.ewma = ewma * w + latency * (1.0 - w)
            self.ewma_ts = now
        sent = self.sent
        if now is not None and sent is not None:
            if len(sent) < 3 * SENT_MAX:
                sent.extend((-1.0 - cls if error else cls, now - latency, latency))
            else:
                self.sent_lost = True
        self.cls_responses[cls] += 1
        if error:
            self.cls_errors[cls] += 1
            self.failures += 1
            self.err += (1.0 - self.err) * ERR_LEARN
            if now is not None and self.curve is not None:
                self.curve.seen = now  # (heard from: exploration need not look there yet)
            if self.failures >= self.eject_after:
                self.on_outlier(self)
        else:
            if self.failures:
                self.failures = 0
            e = self.err
            if e:
                self.err = e * (1.0 - ERR_LEARN) if e > ERR_ZERO else 0.0
            if load >= 0 and self.curve is not None:
                self.curve.learn(cls, latency, load, now, None, mix)
        self.cls_lat_sum[cls] += latency
        self.cls_hist[cls][bisect_left(LATENCY_BOUNDS, latency)] += 1
        t = self.tracer
        if t is not None:
            t.countdown -= 1
            if t.countdown <= 0:
                t.take(self.idx, cls, latency, not error, now)

    def __repr__(self) -> str:
        return f"<Backend {self.name} inflight={self.inflight} ewma={self.ewma * 1e3:.2f}ms>"
