"""The base every routing strategy shares (workers/classic.py, workers/prequal.py, workers/learned.py).

A strategy answers `pick(exclude, cls)` with a `workers.backend.Backend` (or
None when nothing is eligible) from state the worker holds locally.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.backend import Backend


class Strategy:
    """Base: subclasses implement `pick`.  `observe` is shared."""

    name = "base"
    guard = None  # ml only: the guard that judges its picks (workers/guard.py)
    arm = -1  # ml only: the guard's arm that made the last pick

    def __init__(self, backends: list[Backend], *, decay: float = 10.0, rng: random.Random) -> None:
        self.backends = backends
        self.tau = decay
        self.rng = rng
        for b in backends:
            b.tau = decay

    def refresh(self) -> None:
        """Backend availability changed (operator drain, health): rebuild caches."""

    def eligible(self, exclude) -> list[Backend]:
        return [b for b in self.backends if b.available and b not in exclude]

    def pick(self, exclude=(), cls: int = 0) -> Backend | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def abandoned(self, age: float, cls: int = 0) -> None:
        """A client gave up on its request (of class `cls`) `age` seconds
        after it was sent, before any answer (only ml learns from it:
        workers/patience.py)."""

    def observe(self, backend: Backend, rtt: float, now: float) -> None:
        """Peak EWMA of `backend`'s time to first byte (the workers update it
        through `Backend.record(..., now)`)."""
        backend.observe(rtt, now)
