"""Per-backend pools of idle keep-alive upstream connections (one set per worker).

Idle connections are kept LIFO so the warmest socket is reused first and the
coldest ones age out through `upstream_idle`.  A connection the backend closes
while idle removes itself from the pool in `connection_lost`, so it is never
handed to a request.
"""

from __future__ import annotations

import asyncio
import ssl

from lb.core.log import Throttle, log
from workers.timers import CLOCK

TLS_LOG_EVERY = 10.0  # seconds between two upstream_tls_failed lines for one backend


class Pool:
    __slots__ = ("backend", "idle", "max_idle", "idle_timeout", "loop", "factory", "tls",
                 "tls_failures", "_tls_log")

    def __init__(self, backend, loop, factory, *, max_idle: int, idle_timeout: float,
                 tls: dict | None = None) -> None:
        self.backend = backend
        self.loop = loop
        self.factory = factory  # () -> UpstreamConnection
        self.idle: list = []
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        # TLS backends: create_connection's ssl, server_hostname, ssl_handshake_timeout
        self.tls = tls
        self.tls_failures = 0
        self._tls_log = Throttle(TLS_LOG_EVERY)

    def acquire(self):
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.alive:
                return conn
        return None

    def release(self, conn) -> None:
        if len(self.idle) < self.max_idle and conn.alive:
            conn.idle_deadline = CLOCK.now + self.idle_timeout
            conn.reused = True
            self.idle.append(conn)
        else:
            conn.alive = False
            conn.transport.close()

    def discard(self, conn) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def connect(self) -> asyncio.Task:
        """Open a new connection; the task's result is (transport, protocol).
        `backend.connecting` counts the ones still opening (max_pending)."""
        b = self.backend
        b.connecting += 1
        if self.tls is None:
            opening = self.loop.create_connection(self.factory, b.host, b.port)
        else:
            opening = self.loop.create_connection(self.factory, b.host, b.port, **self.tls)
        task = self.loop.create_task(opening)
        task.add_done_callback(self._opened)
        return task

    def _opened(self, task) -> None:
        self.backend.connecting -= 1
        if self.tls is not None and not task.cancelled():
            exc = task.exception()
            if isinstance(exc, ssl.SSLError):
                self._tls_failed(exc)

    def _tls_failed(self, exc: ssl.SSLError) -> None:
        """A TLS handshake with the backend failed (nothing was sent to it):
        counted, and logged at most every TLS_LOG_EVERY seconds per backend."""
        from lb.core.tls import describe

        self.tls_failures += 1
        if self._tls_log.due():
            log("upstream_tls_failed", backend=self.backend.name,
                server_name=self.tls["server_hostname"], error=describe(exc),
                failures=self.tls_failures)

    def expire(self, now: float) -> None:
        idle = self.idle
        if idle and idle[0].idle_deadline < now:
            keep = []
            for conn in idle:
                if conn.idle_deadline < now:
                    conn.alive = False
                    conn.transport.close()
                else:
                    keep.append(conn)
            idle[:] = keep
