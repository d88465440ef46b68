"""`ml`'s exploration (workers/learned.py): the backend a share of the picks
looks at because this worker has not heard from it lately.

Its curve may be out of date there (a slow backend that recovered gets
found); nothing is spent on backends the worker knows.  A failure is news
too, and a backend that keeps failing is looked at less and less often.
"""

from __future__ import annotations


def stale_backend(order, now: float, stale: float, backoff: int):
    """The routable backend of `order` this worker has not heard from for the
    longest, if that is longer than `stale` seconds times one more than its
    failures in a row, up to `backoff` times, and it has nothing in flight
    from this worker (a backend still working through a backlog is not
    news); None if there is none."""
    best = None
    oldest = now
    for b in order:
        seen = b.curve.seen
        f = b.failures
        if (seen < oldest and seen < now - stale * (f + 1 if f < backoff else backoff)
                and b.available and not b.inflight):
            best, oldest = b, seen
    return best
