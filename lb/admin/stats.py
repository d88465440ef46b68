"""The instance as the admin process sees it: worker stats aggregated by name.

Workers send cumulative counters every `learning.stats_interval`.  The admin
keeps the latest `WorkerStats` of every worker pid and sums them when a view
is needed (a scrape, the once-a-second history sample), never per message.
A worker that restarts has a new pid and counts from zero; the old pid's last
counters stay in the sum, and once it has been silent for `RETIRE_AFTER`
seconds they are folded into a base, so totals never go backwards.  Gauges
(in flight, idle connections, client connections, EWMA, policy mode) only
come from workers heard within `LIVE_FOR` seconds.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lb.core.messages import LATENCY_BOUNDS, N_BUCKETS, SupervisorStatus, WorkerStats

LIVE_FOR = 2.0  # seconds: a worker heard more recently counts in the gauges
RETIRE_AFTER = 60.0  # seconds of silence before a pid's counters join the base
HISTORY = 300  # one sample per second: five minutes

STATUS_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
# per-backend counters summed as they are, in BackendStats and BackendTotals alike
SCALAR_COUNTERS = ("requests", "connect_errors", "timeouts", "retries", "resets", "ejections", "overflows")
WORKER_COUNTERS = ("accepted", "requests", "rejected", "timeouts", "no_backend", "shed", "limited",
                   "tls_handshakes", "proxy_errors", "abandoned")
TLS_FAILED = "tls_failed."  # + reason: failed handshakes on the HTTPS listener, in Totals.workers


@dataclass
class BackendTotals:
    """Cumulative counters of one backend, summed over workers."""

    requests: int = 0
    responses: list[int] = field(default_factory=lambda: [0] * len(STATUS_CLASSES))
    connect_errors: int = 0
    timeouts: int = 0
    retries: int = 0
    resets: int = 0
    ejections: int = 0
    overflows: int = 0
    class_responses: dict[str, int] = field(default_factory=dict)
    class_errors: dict[str, int] = field(default_factory=dict)
    class_latency_sum: dict[str, float] = field(default_factory=dict)
    class_latency: dict[str, list[int]] = field(default_factory=dict)

    def add_counters(self, other) -> None:
        """Add the scalar counters of `other` (a BackendTotals or a BackendStats)."""
        for name in SCALAR_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def outcomes(self) -> int:
        return sum(self.class_responses.values())

    def errors(self) -> int:
        return sum(self.class_errors.values())

    def histogram(self) -> list[int]:
        """Latency histogram over every class."""
        out = [0] * N_BUCKETS
        for h in self.class_latency.values():
            for i, c in enumerate(h):
                out[i] += c
        return out


@dataclass
class Totals:
    workers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WORKER_COUNTERS, 0))
    backends: dict[str, BackendTotals] = field(default_factory=dict)

    def add(self, ws: WorkerStats) -> None:
        """Add one worker's cumulative counters."""
        w = self.workers
        for name in WORKER_COUNTERS:
            w[name] += getattr(ws, name)
        for reason, n in ws.tls_failures.items():
            key = TLS_FAILED + reason
            w[key] = w.get(key, 0) + n
        classes = ws.classes
        for b in ws.backends:
            t = self.backends.get(b.name)
            if t is None:
                t = self.backends[b.name] = BackendTotals()
            t.add_counters(b)
            for i, n in enumerate(b.responses[: len(STATUS_CLASSES)]):
                t.responses[i] += n
            for i, cls in enumerate(classes):
                if i < len(b.class_responses):
                    t.class_responses[cls] = t.class_responses.get(cls, 0) + b.class_responses[i]
                if i < len(b.class_errors):
                    t.class_errors[cls] = t.class_errors.get(cls, 0) + b.class_errors[i]
                if i < len(b.class_latency_sum):
                    t.class_latency_sum[cls] = t.class_latency_sum.get(cls, 0.0) + b.class_latency_sum[i]
                if i < len(b.class_latency):
                    h = t.class_latency.get(cls)
                    if h is None:
                        h = t.class_latency[cls] = [0] * N_BUCKETS
                    for j, c in enumerate(b.class_latency[i][:N_BUCKETS]):
                        h[j] += c

    def merged(self, other: Totals) -> Totals:
        out = Totals()
        for src in (self, other):
            for k, v in src.workers.items():
                out.workers[k] = out.workers.get(k, 0) + v
            for name, b in src.backends.items():
                t = out.backends.setdefault(name, BackendTotals())
                t.add_counters(b)
                t.responses = [x + y for x, y in zip(t.responses, b.responses)]
                for cls, n in b.class_responses.items():
                    t.class_responses[cls] = t.class_responses.get(cls, 0) + n
                for cls, n in b.class_errors.items():
                    t.class_errors[cls] = t.class_errors.get(cls, 0) + n
                for cls, s in b.class_latency_sum.items():
                    t.class_latency_sum[cls] = t.class_latency_sum.get(cls, 0.0) + s
                for cls, h in b.class_latency.items():
                    mine = t.class_latency.setdefault(cls, [0] * N_BUCKETS)
                    for j, c in enumerate(h):
                        mine[j] += c
        return out


@dataclass
class Gauges:
    """Instantaneous values from the workers heard within LIVE_FOR."""

    workers: int = 0
    connections: int = 0
    inflight: dict[str, int] = field(default_factory=dict)
    idle: dict[str, int] = field(default_factory=dict)
    ewma: dict[str, float] = field(default_factory=dict)  # mean over workers
    config_weight: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, int] = field(default_factory=dict)  # workers not routing to it
    ramp: dict[str, float] = field(default_factory=dict)  # slow start, lowest over workers
    panic: int = 0  # workers in panic mode
    # (strategy, mode, reason) -> number of workers
    modes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    table_seq_min: int = 0
    table_age_max: float = -1.0


def quantile(hist: list[int], q: float) -> float | None:
    """Latency at quantile q of a bucket histogram, interpolated linearly inside
    the bucket; None without samples.  The overflow bucket reports the last bound."""
    total = sum(hist)
    if total <= 0:
        return None
    rank = q * total
    cum = 0
    for i, c in enumerate(hist):
        if c > 0 and cum + c >= rank:
            lo = LATENCY_BOUNDS[i - 1] if i > 0 else 0.0
            if i >= len(LATENCY_BOUNDS):
                return LATENCY_BOUNDS[-1]
            hi = LATENCY_BOUNDS[i]
            return lo + (hi - lo) * max(0.0, rank - cum) / c
        cum += c
    return LATENCY_BOUNDS[-1]


@dataclass
class Sample:
    """Per-backend totals at one instant (the history's unit)."""

    mono: float
    ts: float
    outcomes: dict[str, int]
    errors: dict[str, int]
    hist: dict[str, list[int]]
    workers: dict[str, int]
    weights: dict[str, float] = field(default_factory=dict)  # intended shares at that time


class Aggregator:
    def __init__(self, backend_order: list[str]) -> None:
        self.order = list(backend_order)  # config order first; others appended as seen
        self.live: dict[int, tuple[float, WorkerStats]] = {}  # pid -> (monotonic, last stats)
        self.base = Totals()
        self.messages = 0
        self.bad = 0
        self.status: SupervisorStatus | None = None
        self.status_at = 0.0
        self.history: deque[Sample] = deque(maxlen=HISTORY + 1)
        self._cache: tuple[float, Totals] | None = None

    # -- input ---------------------------------------------------------------

    def offer_stats(self, ws: WorkerStats, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.messages += 1
        prev = self.live.get(ws.pid)
        if prev is not None and ws.seq < prev[1].seq:
            # Same pid, sequence went back: a new process reused the pid.
            self.base = self.base.merged(_totals_of(prev[1]))
        self.live[ws.pid] = (now, ws)
        for b in ws.backends:
            if b.name not in self.order:
                self.order.append(b.name)
        self._cache = None

    def offer_status(self, st: SupervisorStatus, now: float | None = None) -> None:
        self.status = st
        self.status_at = time.monotonic() if now is None else now

    def retire(self, now: float | None = None) -> None:
        """Fold the counters of long-silent workers into the base."""
        now = time.monotonic() if now is None else now
        gone = [pid for pid, (t, _) in self.live.items() if now - t > RETIRE_AFTER]
        for pid in gone:
            self.base = self.base.merged(_totals_of(self.live.pop(pid)[1]))
        if gone:
            self._cache = None

    # -- views ---------------------------------------------------------------

    def totals(self) -> Totals:
        """Counters over every worker ever heard (cached until the next message)."""
        if self._cache is not None:
            return self._cache[1]
        t = Totals()
        for _, ws in self.live.values():
            t.add(ws)
        t = t.merged(self.base)
        self._cache = (time.monotonic(), t)
        return t

    def live_workers(self, now: float | None = None) -> list[WorkerStats]:
        now = time.monotonic() if now is None else now
        return [ws for t, ws in self.live.values() if now - t <= LIVE_FOR]

    def gauges(self, now: float | None = None) -> Gauges:
        g = Gauges()
        ewma_n: dict[str, int] = {}
        seqs: list[int] = []
        for ws in self.live_workers(now):
            g.workers += 1
            g.connections += ws.connections
            for b in ws.backends:
                g.inflight[b.name] = g.inflight.get(b.name, 0) + b.inflight
                g.idle[b.name] = g.idle.get(b.name, 0) + b.idle
                g.ewma[b.name] = g.ewma.get(b.name, 0.0) + b.ewma
                ewma_n[b.name] = ewma_n.get(b.name, 0) + 1
                g.config_weight[b.name] = b.weight
                g.unavailable[b.name] = g.unavailable.get(b.name, 0) + bool(b.unavailable)
                g.ramp[b.name] = min(g.ramp.get(b.name, 1.0), b.ramp)
            g.panic += bool(ws.panic)
            key = (ws.strategy, ws.mode, ws.mode_reason)
            g.modes[key] = g.modes.get(key, 0) + 1
            if ws.table_age >= 0:
                seqs.append(ws.table_seq)
                g.table_age_max = max(g.table_age_max, ws.table_age)
        for name, n in ewma_n.items():
            g.ewma[name] /= n
        g.table_seq_min = min(seqs) if seqs else 0
        return g

    def sample(self, now: float | None = None) -> Sample:
        """Record one history sample (called once a second)."""
        now = time.monotonic() if now is None else now
        t = self.totals()
        s = Sample(
            mono=now,
            ts=time.time(),
            outcomes={n: b.outcomes() for n, b in t.backends.items()},
            errors={n: b.errors() for n, b in t.backends.items()},
            hist={n: b.histogram() for n, b in t.backends.items()},
            workers=dict(t.workers),
        )
        self.history.append(s)
        return s

    def window(self, seconds: float) -> tuple[Sample, Sample] | None:
        """The newest sample and the one about `seconds` before it."""
        if len(self.history) < 2:
            return None
        new = self.history[-1]
        old = self.history[0]
        for s in reversed(self.history):
            if new.mono - s.mono >= seconds:
                old = s
                break
        if new.mono - old.mono <= 0:
            return None
        return old, new


def _totals_of(ws: WorkerStats) -> Totals:
    t = Totals()
    t.add(ws)
    return t


@dataclass
class Rates:
    """One backend over a window of samples."""

    rps: float
    errors_per_s: float
    error_ratio: float
    share: float
    p50: float | None
    p99: float | None


def rates(old: Sample, new: Sample, names: list[str]) -> dict[str, Rates]:
    dt = max(new.mono - old.mono, 1e-9)
    diffs = {n: max(0, new.outcomes.get(n, 0) - old.outcomes.get(n, 0)) for n in names}
    total = sum(diffs.values())
    out = {}
    for n in names:
        errs = max(0, new.errors.get(n, 0) - old.errors.get(n, 0))
        h_new = new.hist.get(n, [0] * N_BUCKETS)
        h_old = old.hist.get(n, [0] * N_BUCKETS)
        h = [max(0, a - b) for a, b in zip(h_new, h_old)]
        out[n] = Rates(
            rps=diffs[n] / dt,
            errors_per_s=errs / dt,
            error_ratio=errs / diffs[n] if diffs[n] else 0.0,
            share=diffs[n] / total if total else 0.0,
            p50=quantile(h, 0.5),
            p99=quantile(h, 0.99),
        )
    return out
