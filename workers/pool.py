"""Per-backend pools of idle keep-alive upstream connections (one set per worker).

Idle connections are kept LIFO so the warmest socket is reused first and the
coldest ones age out through `upstream_idle`.  A connection the backend closes
while idle removes itself from the pool in `connection_lost`, so it is never
handed to a request.
"""

from __future__ import annotations

import asyncio

from workers.timers import CLOCK


class Pool:
    __slots__ = ("backend", "idle", "max_idle", "idle_timeout", "loop", "factory")

    def __init__(self, backend, loop, factory, *, max_idle: int, idle_timeout: float) -> None:
        self.backend = backend
        self.loop = loop
        self.factory = factory  # () -> UpstreamConnection
        self.idle: list = []
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout

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
        task = self.loop.create_task(self.loop.create_connection(self.factory, b.host, b.port))
        task.add_done_callback(self._opened)
        return task

    def _opened(self, _task) -> None:
        self.backend.connecting -= 1

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
