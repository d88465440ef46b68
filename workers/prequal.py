"""Prequal's hot-cold lexicographic rule, from the worker's own state.

Prequal (Wydrowski, Kleinberg, Rumble: "Load is not what you should balance",
NSDI 2024) picks a server by two signals, requests in flight (RIF) and
estimated latency, read from a pool of recent probe answers:

* a candidate is *hot* when its RIF is above the Q_RIF quantile of the RIF
  values seen recently;
* if every candidate is hot, the one with the fewest requests in flight wins;
* otherwise the cold candidate with the lowest latency estimate wins.

Prequal probes servers because its clients cannot see each other's load.  A
worker already holds both signals for every backend it sends to: its own
in-flight count (divided by the configured weight, so weights keep meaning)
and its peak-EWMA latency.  So this strategy needs no probes: each pick reads
up to `POOL` candidates directly (every backend when there are no more than
that, a random distinct sample otherwise), which plays the part of the
probe pool.  The RIF distribution is a window of the candidates' RIF at
recent picks; its quantile is recomputed every `REQUANTILE` picks, not per
request.

Constants are the paper's published operating range, not fitted to lb's
benchmarks: Q_RIF = 0.8 (the paper explores 0.6-0.9), a pool of 16.
"""

from __future__ import annotations

from workers.strategy import Strategy

POOL = 16  # candidates read per pick (the probe pool's size)
Q_RIF = 0.8  # quantile of recent RIF above which a candidate is hot
WINDOW = 512  # RIF observations kept for the quantile
REQUANTILE = 64  # picks between recomputations of the hot threshold


class Prequal(Strategy):
    name = "prequal"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._window = [0.0] * WINDOW
        self._w = 0  # next slot of the window
        self._seen = 0  # observations so far (the window is full once >= WINDOW)
        self._start = 0  # rotation of a small fleet's candidates
        self._until = 0  # picks left before the threshold is recomputed (now: the first pick)
        self.hot_rif = float("inf")  # no candidate is hot until the window has data

    def _candidates(self, exclude) -> list:
        backends = self.backends
        n = len(backends)
        if not n:
            return []
        if n <= POOL:
            # every backend, from a rotating start: equal candidates (no answer
            # yet, same latency) take turns instead of the first one taking all
            i = self._start = (self._start + 1) % n
            return [b for b in backends[i:] + backends[:i] if b.available and b not in exclude]
        cands = self.eligible(exclude)
        if len(cands) > POOL:
            cands = self.rng.sample(cands, POOL)
        return cands

    def _observe_rif(self, rifs: list[float]) -> None:
        window = self._window
        w = self._w
        for r in rifs:
            window[w] = r
            w += 1
            if w == WINDOW:
                w = 0
        self._w = w
        self._seen += len(rifs)
        self._until -= 1
        if self._until <= 0:
            self._until = REQUANTILE
            n = min(self._seen, WINDOW)
            ordered = sorted(window[:n]) if n < WINDOW else sorted(window)
            self.hot_rif = ordered[min(n - 1, int(Q_RIF * n))]

    def pick(self, exclude=(), cls=0):
        cands = self._candidates(exclude)
        if not cands:
            return None
        if len(cands) == 1:
            return cands[0]
        rifs = [b.inflight / b.weight for b in cands]
        self._observe_rif(rifs)
        hot = self.hot_rif
        best = None
        best_lat = 0.0
        coolest = None
        coolest_rif = 0.0
        for b, r in zip(cands, rifs):
            if r <= hot:
                if best is None or b.ewma < best_lat:
                    best, best_lat = b, b.ewma
            elif coolest is None or r < coolest_rif:
                coolest, coolest_rif = b, r
        return best if best is not None else coolest
