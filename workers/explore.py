"""`ml`'s exploration (workers/learned.py): the backend a share of the picks
looks at because this worker has not heard from it lately.

Its curve may be out of date there (a slow backend that recovered gets
found); nothing is spent on backends the worker knows.  A failure is news
too, and a backend that keeps failing is looked at less and less often.
A backend is looked at with a request of the class that is cheapest there
(by its curve's service times; a class it has not answered yet at its
price in the rows, the table's predicted latency or `own_prior`):
the look costs what that request waits there, and a heavy request sent to
a slow backend to see whether it is still slow is the slowest request of
the run.  (Development fleets 1000-1079, two workers, two arrival seeds:
p99.9 against the best other policy 0.739x -> 0.681x and 0.695x ->
0.669x, geometric means; failed shares 221.2 -> 221.0 and 201.0 -> 201.6
points.)
"""

from __future__ import annotations


def stale_backend(order, now: float, stale: float, backoff: int, cls: int, priors):
    """The routable backend of `order` this worker has not heard from for the
    longest, if that is longer than `stale` seconds times one more than its
    failures in a row, up to `backoff` times, it has nothing in flight
    from this worker (a backend still working through a backlog is not
    news), and class `cls` is its cheapest; None if there is none.
    `priors[c][idx]`: the price of class c at a backend that has not
    answered it (the pick's rows)."""
    best = None
    oldest = now
    for b in order:
        seen = b.curve.seen
        f = b.failures
        if (seen < oldest and seen < now - stale * (f + 1 if f < backoff else backoff)
                and b.available and not b.inflight):
            sv = b.curve.service
            i = b.idx
            mine = sv[cls] or priors[cls][i]
            if any((s or p[i]) < mine for s, p in zip(sv, priors)):
                continue  # another class costs less there: a request of that one looks
            best, oldest = b, seen
    return best
