"""Backends as a worker sees them, and the strategies that pick one per request.

Every strategy answers `pick(exclude)` with a `Backend` (or None when nothing
is eligible) from state the worker holds locally: no I/O, no allocation on the
common path.  Each response head is recorded with one call,
`Backend.record(cls, rtt, error, now)`, which also feeds the peak-EWMA
estimate that `Strategy.observe()` maintains.

The learned policy (`ml`) plugs in as a `TableStrategy`: it routes by a weight
table that the worker receives from the inference process and keeps locally.
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right
from itertools import accumulate
from math import exp

from lb.config import Backend as BackendConfig
from lb.messages import LATENCY_BOUNDS, N_BUCKETS
from workers.prequal import Prequal
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

    def observe(self, rtt: float, now: float) -> None:
        """Peak EWMA (as in Finagle/Linkerd): jump up at once, decay slowly."""
        ewma = self.ewma
        if rtt >= ewma:
            self.ewma = rtt
        else:
            w = exp((self.ewma_ts - now) / self.tau)
            self.ewma = ewma * w + rtt * (1.0 - w)
        self.ewma_ts = now

    def record(self, cls: int, latency: float, error: bool, now: float | None = None) -> None:
        """One outcome of a request of class `cls` sent here: a response head
        after `latency` seconds (an error if 5xx), or a failure without one.
        With `now` (a response head arrived then) the peak EWMA is updated too,
        exactly as `observe(latency, now)` would: one call per response."""
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
        elif self.failures:
            self.failures = 0
        self.cls_lat_sum[cls] += latency
        self.cls_hist[cls][bisect_left(LATENCY_BOUNDS, latency)] += 1
        t = self.tracer
        if t is not None:
            t.countdown -= 1
            if t.countdown <= 0:
                t.take(self.idx, cls, latency, not error)

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
        i = self.i
        b = backends[i % n]
        self.i = i + 1
        # the usual case first, without the loop (the config requires a backend)
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
        if n == 1 or exclude:
            cands = self.eligible(exclude) if (exclude or not backends[0].available) else backends
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


class TableStrategy(P2CEwma):
    """Routes by the inference process's tables (the `ml` strategy).

    A table (`lb.messages.Table`) holds, per request class, a weight for every
    backend (where traffic should go) and the model's expected cost of a
    request there (predicted latency, penalised by predicted error).  A pick:

    * with probability `table.exploration`, one uniform draw over the class's
      backends (every backend the table routes to keeps producing data);
    * otherwise two weighted draws from the class's row, and the one with the
      lower   cost x (in-flight + 1) / (ref in-flight + 1)
                   x peak EWMA / ref peak EWMA x (consecutive failures + 1)
      wins, where "ref" is this worker's state when the tables came (smoothed
      over the last few).  The model supplies what one worker cannot see
      (per-class cost, error probability, capacity, load from every worker);
      the worker supplies what the model cannot know yet: requests it sent
      since, a backend that just turned slow (peak EWMA jumps at once) or
      started failing.  In steady state the live terms are ~1 and the model's
      cost decides.

    A table without costs (older publishers) is compared by weight / (local
    in-flight + 1) instead.

    It falls back to P2C-EWMA (`learned` False, `reason` says why) when it has
    no table, when the table is older than twice its publish interval (the
    inference process is late or down), or when the table itself says the
    model is not to be trusted (`mode == "fallback"`).
    """

    name = "ml"
    REF_KEEP = 0.5  # smoothing of the reference in-flight counts, per table

    def __init__(self, backends, *, class_names=("default",), **kw) -> None:
        super().__init__(backends, **kw)
        self.class_names = list(class_names)
        self.table = None
        self.learned = False
        self.reason = "no_table"
        self.stale_after = 0.0
        self.explore = 0.0
        # per backend idx: this worker's in-flight and peak EWMA when tables came (smoothed)
        self._ref = [0.0] * len(backends)
        self._ewma_ref = [0.0] * len(backends)
        # per local class: (candidates, cumulative weights, scaled cost by backend idx or
        # None, total weight, weight by backend idx)
        self._rows: list[tuple[list[Backend], list[float], list[float] | None, float, list[float]]] = []
        self._cols_for: list[str] | None = None  # the table backend list `_cols` was built for
        self._cols: list[int] = []  # table column of each backend (by idx), -1 if absent

    def set_table(self, table) -> None:
        self.table = table
        self.stale_after = table.ts + 2 * table.interval
        self.explore = table.exploration if table.cost else 0.0
        # this worker's in-flight and peak EWMA per backend, smoothed over tables: the
        # state the table's costs correspond to, so the pick scales a cost by how
        # far the backend has moved from it since
        keep = self.REF_KEEP
        ref, eref = self._ref, self._ewma_ref
        for b in self.backends:
            i = b.idx
            ref[i] = keep * ref[i] + (1.0 - keep) * b.inflight
            eref[i] = keep * eref[i] + (1.0 - keep) * b.ewma if eref[i] > 0 else b.ewma
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the per-class rows (new table, or backend availability changed).

        Runs once per table (every `learning.interval`) on the worker's event
        loop: column lookups are cached while the table's backend list stays the
        same, and each row is one comprehension (256 backends x 8 classes in
        well under a millisecond; bench/inference_bench.py measures it)."""
        table = self.table
        if table is None:
            self._rows = []
            return
        if table.backends != self._cols_for:
            col = {name: i for i, name in enumerate(table.backends)}
            self._cols = [col.get(b.name, -1) for b in self.backends]
            self._cols_for = table.backends
        # the table's column of each backend (by idx), -1 if absent or unavailable
        cols = [c if b.available else -1 for b, c in zip(self.backends, self._cols)]
        rows_by_name = dict(zip(table.classes, table.weights))
        default = rows_by_name.get("default") or (table.weights[0] if table.weights else [])
        costs_by_name = dict(zip(table.classes, table.cost)) if table.cost else {}
        default_cost = costs_by_name.get("default") or (table.cost[0] if table.cost else None)
        # cost / reference state: the reference in-flight and peak EWMA, by backend idx
        denom = [(r + 1.0) * max(e, 1e-6) for r, e in zip(self._ref, self._ewma_ref)]
        backends = self.backends
        rows = []
        for cname in self.class_names:
            trow = rows_by_name.get(cname, default)
            crow = costs_by_name.get(cname, default_cost)
            nt = len(trow)
            weight = [trow[c] if 0 <= c < nt else 0.0 for c in cols]
            cands = [b for b, w in zip(backends, weight) if w > 0]
            scaled = None  # no costs (an older publisher): compare by weight
            if crow is not None:
                nc = min(len(crow), nt)
                if all(cols[b.idx] < nc for b in cands):
                    scaled = [max(crow[c], 1e-9) / d if 0 <= c < nc else -1.0
                              for c, d in zip(cols, denom)]
            cum = list(accumulate(weight[b.idx] for b in cands))
            rows.append((cands, cum, scaled, cum[-1] if cum else 0.0, weight))
        self._rows = rows

    def check(self, now: float) -> tuple[bool, str]:
        """Decide the mode from the table held at wall-clock `now`."""
        table = self.table
        if table is None:
            learned, reason = False, "no_table"
        elif now > self.stale_after:
            learned, reason = False, "stale"
        elif table.mode != "learned":
            learned, reason = False, table.reason or "inference_fallback"
        elif not any(r[0] for r in self._rows):
            learned, reason = False, "no_weights"
        else:
            learned, reason = True, ""
        self.learned = learned
        self.reason = reason
        return learned, reason

    def pick(self, exclude=(), cls=0):
        if not self.learned or exclude:
            return super().pick(exclude)
        cands, cum, scaled, top, weight = self._rows[cls]
        if not cands:
            return super().pick(exclude)
        rnd = self.rng.random
        r = rnd()
        explore = self.explore
        if r < explore:
            return cands[int(r / explore * len(cands))]
        # r is uniform on [explore, 1): reused for the first draw
        a = cands[bisect_right(cum, (r - explore) / (1.0 - explore) * top)]
        b = cands[bisect_right(cum, rnd() * top)]
        if a is b:
            return a
        if scaled is None:
            return a if weight[a.idx] / (a.inflight + 1) >= weight[b.idx] / (b.inflight + 1) else b
        # cost x (in-flight + 1) x peak EWMA x (consecutive failures + 1), the first
        # two relative to the state when the table came (folded into `scaled`)
        if (scaled[a.idx] * (a.inflight + 1) * a.ewma * (a.failures + 1)
                <= scaled[b.idx] * (b.inflight + 1) * b.ewma * (b.failures + 1)):
            return a
        return b


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (RoundRobin, WeightedRoundRobin, LeastConnections, Random, P2CEwma, Prequal, TableStrategy)
}


def make_strategy(name: str, backends: list[Backend], *, decay: float, seed: int = 0,
                  class_names=("default",)) -> Strategy:
    rng = random.Random(seed or None)
    if name == TableStrategy.name:
        return TableStrategy(backends, decay=decay, rng=rng, class_names=class_names)
    return STRATEGIES[name](backends, decay=decay, rng=rng)
