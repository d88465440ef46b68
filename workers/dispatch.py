"""Sending an exchange to a backend: pick, pooled or new connection, retries,
upstream timeouts.  One `Dispatcher` per worker; the client connection that
owns an exchange (`ex.conn`) answers it when nothing can be forwarded."""

from __future__ import annotations

import time

from workers.exchange import Exchange
from workers.listener import LOCAL_ERRNOS
from workers.timers import CLOCK

monotonic = time.monotonic


class Dispatcher:
    __slots__ = ("worker",)

    def __init__(self, worker) -> None:
        self.worker = worker

    def dispatch(self, ex: Exchange, backend=None) -> None:
        """Bind `ex` to `backend` (or the strategy's pick) and send its head, or
        open a connection for it; answer 503 when nothing can take it.  With a
        body collected (`ex.pending`), the caller flushes it (`ex.flush()`)."""
        w = self.worker
        if backend is None:
            if w.active >= w.max_active:
                w.shed += 1  # load shedding: the instance-wide in-flight cap
                ex.conn.write_error(ex, 503)
                return
            strategy = w.strategy
            backend = strategy.pick((), ex.cls)
            if backend is None:
                w.no_backend += 1
                ex.conn.write_error(ex, 503)
                return
            if strategy.guard is not None and strategy.arm >= 0:
                ex.guard = strategy.guard
                ex.arm = strategy.arm
                ex.guard_t0 = monotonic()  # retries reset t0; the arm answers for them all
            if backend.ramp < 1.0 or backend.inflight >= backend.max_conns:
                backend = self._second_choice(backend, ex)
                if backend is None:
                    w.shed += 1  # every candidate's circuit breaker is open
                    ex.conn.write_error(ex, 503)
                    return
        elif backend.inflight >= backend.max_conns:
            backend.overflows += 1
            w.shed += 1
            ex.conn.write_error(ex, 503)
            return
        backend.requests += 1
        ex.t0 = now = monotonic()
        ex.load = load = backend.inflight  # for the load curve (workers/loadcurve.py, ml only)
        cv = backend.curve
        if cv is not None:
            ex.curve = cv
            ex.work, ex.mix = cv.start(ex.cls, load, now)
        backend.inflight = load + 1
        w.active += 1
        ex.backend = backend
        ex.bound = True
        # Pool.acquire(), inlined for the usual case (tests/unit/test_inline_copies.py
        # checks they agree): the warmest idle connection is alive (a closed one
        # leaves the pool in connection_lost).
        idle = backend.pool.idle
        up = idle.pop() if idle else None
        if up is not None and not up.alive:
            up = backend.pool.acquire()
        if up is not None:
            up.ex = ex
            ex.upstream = up
            if ex.pending is None:
                up.transport.write(ex.head)
            return
        if backend.connecting >= backend.max_pending:
            backend.overflows += 1
            w.shed += 1
            ex.unbind()
            ex.conn.write_error(ex, 503)
            return
        task = ex.connecting = backend.pool.connect()
        task.add_done_callback(ex.on_connected)

    def _second_choice(self, first, ex: Exchange):
        """`first` is slow-starting or full: keep it with probability `ramp` if
        it has room, else pick another backend with room; None if none has."""
        w = self.worker
        room = first.inflight < first.max_conns
        if room and w.rng() < first.ramp:
            return first
        if not room:
            first.overflows += 1
        exclude = [first]
        while True:
            alt = w.strategy.pick(exclude, ex.cls)
            if alt is None:
                break
            if alt.inflight < alt.max_conns:
                return alt
            alt.overflows += 1
            exclude.append(alt)
        return first if room else None

    def connected(self, ex: Exchange, task) -> None:
        """The connect task of `ex` ended (done callback)."""
        if ex.connecting is not task:
            # Superseded (timed out, or the client left): keep a good connection.
            if not task.cancelled() and task.exception() is None:
                proto = task.result()[1]
                proto.pool.release(proto)
            return
        ex.connecting = None
        exc = task.exception()
        if exc is not None:
            if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
                # Out of descriptors or memory here: not the backend's failure,
                # and no other backend would do better.
                self.worker.listener.local_error(exc)
                ex.unbind()
                ex.upstream = None
                ex.conn.write_error(ex, 503)
                return
            ex.backend.connect_errors += 1
            ex.unbind()
            self.failed(ex, sent_nothing=True, status=502)
            return
        proto = task.result()[1]
        proto.ex = ex
        ex.upstream = proto
        ex.last_io = CLOCK.now
        if ex.pending is None:
            proto.transport.write(ex.head)
        else:
            ex.flush()

    def failed(self, ex: Exchange, *, sent_nothing: bool, status: int, reused: bool = False) -> None:
        """No response byte came back from `ex.backend`: retry elsewhere, or answer `status`.

        A failed connect is retried on another backend only (as nginx does: one
        backend, no retry).  A pooled connection that died under the request is
        retried on any backend, the same one included, on a fresh connection.
        """
        ex.upstream = None
        backend = ex.backend
        w = self.worker
        if not reused:  # a pooled connection closed while idle is not the backend failing
            backend.record(ex.cls, monotonic() - ex.t0, True)
        tried = ex.tried
        if tried is None:
            tried = ex.tried = []
        tried.append(backend)
        if sent_nothing:
            retry = ex.idempotent or w.retry_connect_non_idempotent
        else:
            # Sent, and no answer: only a bodyless idempotent request can be resent.
            retry = ex.idempotent and ex.pending is None and not ex.has_body
            ex.retry_same = reused
        if retry and len(tried) <= w.retries and not ex.conn.closed:
            nxt = w.strategy.pick(tried, ex.cls)
            if nxt is None and ex.retry_same:
                nxt = w.strategy.pick((), ex.cls)
            if nxt is not None:
                backend.retries += 1
                self.dispatch(ex, nxt)
                if ex.pending and ex.upstream is not None:
                    ex.flush()
                return
        self.error(ex, status)

    def error(self, ex: Exchange, status: int) -> None:
        """`ex` cannot be forwarded any more: answer `status`."""
        ex.upstream = None
        ex.unbind()
        if ex.guard is not None:  # the request failed: an error outcome for the arm that routed it
            ex.guard.outcome(ex.arm, monotonic() - ex.guard_t0, True)
        if ex.backend is not None:
            ex.backend.responses[5] += 1
        ex.conn.write_error(ex, status)

    def timeout(self, ex: Exchange) -> None:
        """Called by the sweep: `ex` waited too long to connect or for response bytes."""
        backend = ex.backend
        backend.timeouts += 1
        self.worker.timeouts += 1
        if ex.connecting is not None:
            task = ex.connecting
            ex.connecting = None
            task.cancel()
            ex.unbind()
            self.failed(ex, sent_nothing=True, status=504)
            return
        up = ex.upstream
        if up is not None:
            ex.upstream = None
            up.abandon()
        ex.unbind()
        if ex.response_started:
            ex.conn.abort_after_upstream(ex)
        else:
            backend.record(ex.cls, monotonic() - ex.t0, True)
            self.error(ex, 504)

    @staticmethod
    def abandon(ex: Exchange) -> None:
        """The client went away (or broke its request): drop what `ex` holds upstream.
        A client gone while its request waited for the backend's answer gave
        up on it: the strategy learns how long clients wait (workers/patience.py)."""
        if ex.bound and ex.body_done and not ex.response_started:
            w = ex.conn.worker
            w.abandoned += 1
            w.strategy.abandoned(monotonic() - ex.t0, ex.cls)
        task = ex.connecting
        if task is not None:
            ex.connecting = None
            task.cancel()
        ex.unbind()
        up = ex.upstream
        if up is not None:
            ex.upstream = None
            up.abandon()
