"""Capacity exploration for `ml`: find how many requests a backend serves at
once when ordinary traffic never shows it.

A load curve (workers/loadcurve.py, and the admin's of the whole instance,
lb/admin/loadcurves.py, which the capacity reads) learns a backend's slot
count only from answers to requests sent while others were in flight there.
`ml` keeps most of the traffic on its fastest backends, so a slower one may
never hold more than one request, and its capacity stays a lower bound
(`GET /api/capacity`, `known: false`).  (The campaigns are steered by this
worker's own curve: a campaign that makes the backend queue shows the knee
to the admin's curve too.)

A `KneeProbe` spends a small, bounded share of the picks (`capacity.explore`)
to measure it.  A campaign on backend b holds this worker's in-flight count
there at `goal` = its slot count (rounded down) + 1 until ANSWERS requests have
been sent at that load, then at one more, up to CLIMB over the slot count: if
the backend queues them, its curve sees the knee (the count is measured); if
not, its curve's fit rises to the highest load that did not queue, and the
next campaign climbs from there.  Each request a campaign sends costs one
token; a token accrues per 1 / share picks, into a bucket that starts full
and holds TOKENS at most.  A campaign starts only when the tokens pay for its
first load and climbs while they last, so campaigns never take more than
`share` of a worker's picks, plus TOKENS.

Which backends: those whose curve shows no knee now (a slot count that is a
lower bound), that answer without failures, that are no dearer than RATIO
times the cheapest backend of the request's class (a campaign on a backend
far slower than the rest would cost more latency than its capacity is worth
here), and that no campaign of this worker visited in the last EVERY
seconds; the one visited least lately first.
"""

from __future__ import annotations

import math

ANSWERS = 3  # requests sent at each goal load before the campaign climbs one more
CLIMB = 3  # a campaign climbs to at most this many requests over the curve's slot count
RATIO = 4.0  # a campaign's backend costs at most this times the cheapest one's price
EVERY = 10.0  # seconds between two campaigns of a worker on the same backend
SPAN = 1.0  # seconds a campaign may last at most
TOKENS = 16.0  # most tokens kept (the largest burst)
LOOK = 0.25  # seconds between two looks for a backend to measure (a look scans the cheap ones)


class KneeProbe:
    """One worker's capacity exploration (see the module docstring)."""

    __slots__ = ("share", "tokens", "target", "goal", "top", "sent", "until", "visited", "look_at")

    def __init__(self, share: float) -> None:
        self.share = share
        self.tokens = TOKENS  # (a bucket starts full: the first campaign need not wait)
        self.target = None  # the backend of the campaign under way (None: none)
        self.goal = 0  # the in-flight count the campaign holds there now
        self.top = 0  # ... and the most it climbs to
        self.sent = 0  # requests it sent at the goal load
        self.until = 0.0  # clock time it ends at the latest
        self.visited: dict[int, float] = {}  # backend idx -> when its last campaign started
        self.look_at = 0.0  # clock time before which no new campaign is looked for

    def steer(self, order: list, prices: list, now: float):
        """The backend this pick goes to for a campaign, or None (the pick is the
        strategy's).  `order`/`prices`: the class's candidates by price."""
        tokens = self.tokens + self.share
        self.tokens = tokens if tokens < TOKENS else TOKENS
        b = self.target
        if b is not None:
            if self.sent >= ANSWERS and self.goal < self.top:
                self.goal += 1
                self.sent = 0
            if now > self.until or self.sent >= ANSWERS or not b.available or b.failures:
                self.target = None
            elif b.inflight < self.goal and self.tokens >= 1.0:
                if b not in order or prices[order.index(b)] > RATIO * prices[0]:
                    return None  # not a candidate for this class: another pick will do
                self.tokens -= 1.0
                if b.inflight + 1 == self.goal:
                    self.sent += 1
                return b
            return None
        if not order or now < self.look_at or self.tokens < ANSWERS + 1:
            return None  # (a look scans the cheap backends: not on every pick)
        self.look_at = now + LOOK
        limit = RATIO * prices[0]
        best = None
        oldest = now - EVERY
        for b, price in zip(order, prices):
            if price > limit:
                break
            c = b.curve
            if c is None or c.top > c.measured + 0.5 or not b.available or b.failures:
                continue  # its knee shows (or it fails, or is out)
            at = self.visited.get(b.idx, -math.inf)
            if at <= oldest and (best is None or at < oldest):  # (ties: the cheaper)
                best, oldest = b, at
        if best is None:
            return None
        goal = int(best.curve.measured) + 1
        if goal <= best.inflight or self.tokens < goal - best.inflight + ANSWERS:
            return None  # already held there, or the budget cannot pay for it yet
        self.target, self.goal, self.top, self.sent, self.until = best, goal, goal - 1 + CLIMB, 0, now + SPAN
        self.visited[best.idx] = now
        self.tokens -= 1.0
        if best.inflight + 1 == goal:
            self.sent = 1
        return best
