"""A worker's listening sockets, with a cap on the client connections they hold.

At `max_connections` the worker stops accepting: it closes its asyncio server
(which owns a duplicate of the inherited descriptor, never the descriptor
itself), so new connections wait in the kernel's listen queue instead of
taking descriptors the worker needs for upstream connections; below the
resume mark it serves the same socket again.  The supervisor's copy of the
socket and this one keep the queue alive meanwhile: nothing queued is reset.

Local resource errors (out of descriptors or kernel memory) are the worker's
problem, not a backend's: `LOCAL_ERRNOS` tells them apart on a failed connect.
"""

from __future__ import annotations

import errno
import os
import resource
import socket

from lb.core.log import Throttle, log

# errnos of a connect that failed here, not at the backend
LOCAL_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
RESERVED_FDS = 64  # listener, epoll, pipes, ZeroMQ sockets, log files, the admin's share
LOG_EVERY = 1.0  # seconds between two local_resource_error lines


def connection_cap(configured: int, n_backends: int, keepalive: int) -> int:
    """`limits.max_connections`, or when 0, what RLIMIT_NOFILE leaves room for:
    each client connection may hold one upstream connection, and the idle
    pools keep up to `keepalive` per backend."""
    if configured:
        return configured
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 24:
        soft = 1 << 24
    pools = min(n_backends * keepalive, soft // 4)
    return max(1, (soft - RESERVED_FDS - pools) // 2)


class Listener:
    """Serves the worker's sockets (the plain one, and the HTTPS one when
    configured), each through its protocol factory (`serve`); pauses all of
    them at `cap` connections in total, resumes at `resume_at`."""

    def __init__(self, worker, backlog: int, cap: int) -> None:
        self.worker = worker
        self.served: list[_Served] = []
        self.backlog = backlog
        self.cap = cap
        # A little below the cap, so a busy worker does not flap at the mark.
        self.resume_at = cap - max(1, cap // 10) if cap > 1 else 0
        self.paused = False
        self.resuming = False
        self.closed = False
        self.pauses = 0
        self.local_errors = 0
        self._throttle = Throttle(LOG_EVERY)
        self._unlogged = 0

    async def serve(self, sock: socket.socket, factory, **server_kw) -> None:
        """Accept on `sock` (server_kw: ssl and its handshake timeout)."""
        s = _Served(sock, factory, server_kw)
        s.server = await self._open(s)
        self.served.append(s)
        if self.paused or self.closed:  # paused (or closed) while this one was opening
            s.server.close()
            if self.closed:
                s.sock.close()

    async def _open(self, s: "_Served"):
        # The server closes the socket it was given: give it a duplicate.
        dup = socket.socket(fileno=os.dup(s.sock.fileno()))
        try:
            return await self.worker.loop.create_server(s.factory, sock=dup, backlog=self.backlog,
                                                        **s.server_kw)
        except BaseException:
            dup.close()
            raise

    def accepted(self) -> None:
        """Called by each new connection (a Downstream, or one still in its TLS
        handshake or before its PROXY header): at the cap, stop accepting."""
        w = self.worker
        if len(w.conns) + len(w.pending) >= self.cap:
            self.pause()

    def pause(self) -> None:
        """Called by a new connection that reached the cap (inside connection_made,
        so the accept loop stops right after it)."""
        if self.paused or self.closed or not self.served:
            return
        self.paused = True
        self.pauses += 1
        for s in self.served:
            s.server.close()
        log("accept_paused", slot=self.worker.slot, connections=len(self.worker.conns),
            max_connections=self.cap)

    def maybe_resume(self) -> None:
        w = self.worker
        if (self.paused and not self.resuming and not self.closed
                and len(w.conns) + len(w.pending) <= self.resume_at):
            self.resuming = True
            self.worker.loop.create_task(self._resume())

    async def _resume(self) -> None:
        opened = []
        try:
            for s in self.served:
                opened.append(await self._open(s))
        except OSError as exc:  # out of descriptors for the duplicate: the sweep retries
            for server in opened:
                server.close()
            self.local_error(exc)
            return
        finally:
            self.resuming = False
        if self.closed:
            for server in opened:
                server.close()
            return
        for s, server in zip(self.served, opened):
            s.server = server
        self.paused = False
        log("accept_resumed", slot=self.worker.slot, connections=len(self.worker.conns),
            max_connections=self.cap)

    def close(self) -> None:
        """Stop accepting for good (drain): this worker's copies of the sockets go
        too, so once the supervisor closes its own, connections are refused."""
        if self.closed:
            return
        self.closed = True
        for s in self.served:
            if not self.paused:
                s.server.close()
            s.sock.close()

    def local_error(self, exc: OSError) -> None:
        """Counted, and logged at most once a second (with how many since the last line)."""
        self.local_errors += 1
        self._unlogged += 1
        if self._throttle.due():
            log("local_resource_error", slot=self.worker.slot,
                error=errno.errorcode.get(exc.errno, str(exc.errno)), count=self._unlogged,
                connections=len(self.worker.conns))
            self._unlogged = 0


class _Served:
    __slots__ = ("sock", "factory", "server_kw", "server")

    def __init__(self, sock: socket.socket, factory, server_kw: dict) -> None:
        self.sock = sock
        self.factory = factory
        self.server_kw = server_kw
        self.server = None
