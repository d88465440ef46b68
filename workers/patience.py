"""How long a worker's clients wait for an answer before they give up: past
that, a request is lost wherever it is sent (ml's pick, workers/learned.py,
stops weighing such backends against each other).

A client that closes its connection while its request waits for a backend's
answer (workers/dispatch.py, `Dispatcher.abandon`) has given up after `age`
seconds.  `Patience` tracks a high quantile (QUANTILE) of those ages in log
terms, by a fixed step per abandonment: clients that give up early for
reasons of their own (a page closed) move it little, and clients that share
a timeout put it at that timeout within a few dozen abandonments.  Until
the first one, and never above it, the deadline is lb's own: the upstream
response timeout (`timeouts.upstream_response`), after which lb answers 504
itself.
"""

from __future__ import annotations

import math

INF = float("inf")
QUANTILE = 0.9  # of the ages at which clients gave up
STEP = 0.05  # ln seconds per abandonment (up by STEP x QUANTILE, down by STEP x (1 - QUANTILE))


class Patience:
    __slots__ = ("limit", "log_age", "given_up", "deadline")

    def __init__(self, limit: float = INF) -> None:
        self.limit = limit  # lb's own deadline (the upstream response timeout)
        self.log_age = 0.0  # the quantile, ln seconds (once given_up)
        self.given_up = 0  # abandonments seen
        self.deadline = limit  # seconds: min(limit, the quantile)

    def gave_up(self, age: float) -> None:
        """A client closed its connection `age` seconds after its request was sent
        (before any answer)."""
        x = math.log(age if age > 1e-3 else 1e-3)
        if not self.given_up:
            self.log_age = x
        elif x < self.log_age:
            self.log_age -= STEP * (1.0 - QUANTILE)
        else:
            self.log_age += STEP * QUANTILE
        self.given_up += 1
        d = math.exp(self.log_age)
        self.deadline = d if d < self.limit else self.limit
