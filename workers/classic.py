"""The classic strategies: round robin, smooth weighted round robin (as nginx),
least connections, weighted random, and P2C over peak EWMA x in-flight (as
Finagle/Linkerd).

Every strategy answers `pick(exclude, cls)` with a `workers.backend.Backend`
(or None when nothing is eligible) from state the worker holds locally: no
I/O, no allocation on the common path.  Prequal (workers/prequal.py) and the
learned policy (`ml`, workers/learned.py) live in their own modules;
workers/strategies.py maps names to classes.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

from workers.strategy import Strategy


class _Rotating(Strategy):
    """A strategy that starts each pick one place further round the backends."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.i = 0


class RoundRobin(_Rotating):
    name = "round_robin"

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


class LeastConnections(_Rotating):
    """Fewest in-flight requests relative to weight; ties rotate."""

    name = "least_connections"

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
