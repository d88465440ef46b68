"""Backends as a worker sees them, and the strategies that pick one per request.

Every strategy answers `pick(exclude)` with a `Backend` (or None when nothing
is eligible) from state the worker holds locally: no I/O, no allocation on the
common path.  `observe()` is called once per finished exchange with the
time-to-first-byte, which feeds the peak-EWMA estimate.

The learned policy (`ml`) plugs in as a `TableStrategy`: it routes by a weight
table that the worker receives from the inference process and keeps locally.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from itertools import accumulate

from lb.config import Backend as BackendConfig

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
        "cw",
        "available",
        # counters, shipped to the supervisor with the periodic stats
        "requests",
        "responses",
        "connect_errors",
        "timeouts",
        "retries",
        "resets",
    )

    def __init__(self, cfg: BackendConfig) -> None:
        host, _, port = cfg.address.rpartition(":")
        self.name = cfg.name
        self.host = host.strip("[]")
        self.port = int(port)
        self.weight = cfg.weight
        self.pool = None  # set by the worker
        self.inflight = 0
        self.ewma = DEFAULT_RTT
        self.ewma_ts = 0.0
        self.cw = 0  # smooth weighted round robin state
        self.available = cfg.weight > 0
        self.requests = 0
        self.responses = [0, 0, 0, 0, 0, 0]  # by status class; [0] = no response
        self.connect_errors = 0
        self.timeouts = 0
        self.retries = 0
        self.resets = 0

    def __repr__(self) -> str:
        return f"<Backend {self.name} inflight={self.inflight} ewma={self.ewma * 1e3:.2f}ms>"


class Strategy:
    """Base: subclasses implement `pick`.  `observe` is shared."""

    name = "base"

    def __init__(self, backends: list[Backend], *, decay: float = 10.0, rng: random.Random) -> None:
        self.backends = backends
        self.tau = decay
        self.rng = rng

    def eligible(self, exclude) -> list[Backend]:
        return [b for b in self.backends if b.available and b not in exclude]

    def pick(self, exclude=()) -> Backend | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def observe(self, backend: Backend, rtt: float, now: float) -> None:
        """Peak EWMA (as in Finagle/Linkerd): jump up at once, decay slowly."""
        ewma = backend.ewma
        if rtt >= ewma:
            backend.ewma = rtt
        else:
            w = math.exp((backend.ewma_ts - now) / self.tau)
            backend.ewma = ewma * w + rtt * (1.0 - w)
        backend.ewma_ts = now


class RoundRobin(Strategy):
    name = "round_robin"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.i = 0

    def pick(self, exclude=()):
        backends = self.backends
        n = len(backends)
        for _ in range(n):
            b = backends[self.i % n]
            self.i += 1
            if b.available and b not in exclude:
                return b
        return None


class WeightedRoundRobin(Strategy):
    """Smooth weighted round robin, as nginx does it: spreads picks evenly."""

    name = "weighted_round_robin"

    def pick(self, exclude=()):
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

    def pick(self, exclude=()):
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
        self._rebuild()

    def _rebuild(self) -> None:
        self._avail = [b for b in self.backends if b.available]
        self._cum = list(accumulate(b.weight for b in self._avail))

    def pick(self, exclude=()):
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

    def pick(self, exclude=()):
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
    """Routes by an externally computed weight table (the `ml` strategy).

    Until a table arrives, or when it is stale, it falls back to P2C-EWMA.  The
    table is a mapping backend name -> weight; the pick is two weighted-random
    draws compared by weight / (in-flight + 1).
    """

    name = "ml"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.table = None
        self._cands: list[Backend] = []
        self._cum: list[float] = []

    def set_table(self, weights: dict[str, float] | None) -> None:
        self.table = weights
        if not weights:
            self._cands, self._cum = [], []
            return
        cands = [b for b in self.backends if b.available and weights.get(b.name, 0) > 0]
        self._cands = cands
        self._cum = list(accumulate(weights[b.name] for b in cands))

    def pick(self, exclude=()):
        if self.table is None or exclude or not self._cum:
            return super().pick(exclude)
        rnd = self.rng.random
        top = self._cum[-1]
        a = self._cands[bisect_right(self._cum, rnd() * top)]
        b = self._cands[bisect_right(self._cum, rnd() * top)]
        t = self.table
        return a if t[a.name] / (a.inflight + 1) >= t[b.name] / (b.inflight + 1) else b


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (RoundRobin, WeightedRoundRobin, LeastConnections, Random, P2CEwma, TableStrategy)
}


def make_strategy(name: str, backends: list[Backend], *, decay: float, seed: int = 0) -> Strategy:
    rng = random.Random(seed or None)
    return STRATEGIES[name](backends, decay=decay, rng=rng)
