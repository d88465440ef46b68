"""Per-client-IP rate limiting: one token bucket per address, in each worker.

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; a
request takes one token or is answered 429.  Buckets are created on first use
and the periodic sweep forgets the ones that are full again (an idle client
costs nothing), so memory follows the number of recently active clients.

The limit is per worker: the kernel spreads a client's connections over the
workers, so a client with many connections can reach up to workers x rate.
"""

from __future__ import annotations

import time

monotonic = time.monotonic


class RateLimiter:
    __slots__ = ("rate", "burst", "buckets")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, round(rate)))
        self.buckets: dict[bytes, list[float]] = {}  # ip -> [tokens, last refill]

    def allow(self, ip: bytes) -> bool:
        now = monotonic()
        b = self.buckets.get(ip)
        if b is None:
            self.buckets[ip] = [self.burst - 1.0, now]
            return True
        tokens = min(self.burst, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if tokens >= 1.0:
            b[0] = tokens - 1.0
            return True
        b[0] = tokens
        return False

    def sweep(self, now: float) -> None:
        """Forget the buckets that have refilled completely."""
        full = [ip for ip, (tokens, last) in self.buckets.items()
                if tokens + (now - last) * self.rate >= self.burst]
        for ip in full:
            del self.buckets[ip]
