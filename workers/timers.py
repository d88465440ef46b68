"""A coarse clock for the hot path.

Deadlines are plain floats stored on connections and checked by one sweep a
few times a second (see `Worker._sweep`); nothing schedules a timer per
request.  `CLOCK.now` is refreshed by that sweep, so it may lag by up to one
sweep interval, which is the resolution of every timeout.
"""

from __future__ import annotations

import time

INF = float("inf")
SWEEP_INTERVAL = 0.25


class Clock:
    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = time.monotonic()

    def tick(self) -> float:
        self.now = time.monotonic()
        return self.now


CLOCK = Clock()
