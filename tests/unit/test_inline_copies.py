"""The copies kept inline on the request path, against the functions they copy.

`UpstreamConnection._finish` inlines `Exchange.unbind()` and `Pool.release()`,
`Dispatcher.dispatch` inlines `Pool.acquire()` (one call each saved per
request).  Each case runs the inlined path and the plain calls on two
identical setups and compares every field they touch.  (Backend.observe's
inline copy is checked in tests/process/test_strategies.py.)
"""

from __future__ import annotations

import pytest

from lb.core import config
from tests.memtransport import Transport
from workers.downstream import Downstream
from workers.exchange import Exchange
from workers.loadcurve import Curve
from workers.pool import Pool
from workers.timers import CLOCK
from workers.upstream import UpstreamConnection
from workers.worker import Worker

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HEAD = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


def setup(max_idle: int, idle_before: int, curve: bool, alive: bool = True):
    """A worker, one backend with `idle_before` idle connections, and a bound
    exchange on one more connection (as dispatch leaves it)."""
    w = Worker(config.from_dict({"backends": [{"address": "127.0.0.1:9"}]}))
    w.scan_request = w.scan_response = None
    b = w.backends[0]
    b.pool = Pool(b, None, None, max_idle=max_idle, idle_timeout=30)
    for _ in range(idle_before):
        other = UpstreamConnection(b, w)
        other.connection_made(Transport())
        b.pool.idle.append(other)
    if curve:
        b.curve = Curve(1)
    down = Downstream(w)
    down.connection_made(Transport())
    up = UpstreamConnection(b, w)
    up.connection_made(Transport())
    up.alive = alive
    ex = Exchange(down, b"GET", HEAD)
    down.ex = ex
    ex.backend = b
    ex.bound = True
    ex.t0 = 1.0
    b.inflight = 3
    w.active = 5
    if curve:
        ex.curve = b.curve
        ex.work, ex.mix = b.curve.start(0, 2, 1.0)
    up.ex = ex
    ex.upstream = up
    return w, b, up, ex


def touched(w, b, up, ex) -> tuple:
    return (b.inflight, w.active, ex.bound, ex.curve is None,
            None if b.curve is None else b.curve.work,
            [c is up for c in b.pool.idle], up.alive, up.reused, up.idle_deadline - CLOCK.now,
            up.transport.closed, up.transport.aborted)


@pytest.mark.parametrize("max_idle,idle_before,curve,alive", [
    (4, 0, False, True), (4, 2, True, True), (2, 2, True, True), (4, 1, False, False),
])
def test_finish_agrees_with_unbind_and_release(max_idle, idle_before, curve, alive):
    inlined = setup(max_idle, idle_before, curve, alive)
    up = inlined[2]
    up.data_received(RESPONSE)  # the response completes: _finish
    assert up.ex is None
    after_inlined = touched(*inlined)  # (before the next setup moves the clock)

    plain = setup(max_idle, idle_before, curve, alive)
    w, b, up2, ex2 = plain
    up2.ex = None
    ex2.unbind()
    b.pool.release(up2)
    assert after_inlined == touched(*plain)


@pytest.mark.parametrize("alive", [[True, True], [False, True], [True, False], [False, False], []])
def test_dispatch_takes_the_connection_acquire_would(alive):
    picks = []
    for inline in (True, False):
        w, b, _, _ = setup(8, 0, False)
        b.inflight = w.active = 0
        conns = []
        for ok in alive:
            c = UpstreamConnection(b, w)
            c.connection_made(Transport())
            c.alive = ok
            conns.append(c)
        b.pool.idle[:] = conns
        if inline:
            down = Downstream(w)
            down.connection_made(Transport())
            ex = Exchange(down, b"GET", HEAD)
            down.ex = ex
            b.max_pending = 0  # no live connection: 503 rather than a connect
            w.dispatcher.dispatch(ex, b)
            got = ex.upstream
        else:
            got = b.pool.acquire()
        picks.append((conns.index(got) if got in conns else None, [conns.index(c) for c in b.pool.idle]))
    assert picks[0] == picks[1]
