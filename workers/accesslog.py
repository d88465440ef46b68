"""The optional access log: sampled, buffered, never on the request path's
critical cost.

Per finished response the worker decrements a countdown (one attribute
update); only a sampled request builds a record.  Records are JSON lines
collected in memory and appended to the file by the worker's sweep (every
0.25 s) or when the buffer passes `buffer` bytes, in one `write()` on a file
opened with O_APPEND, so lines of several workers never interleave.  If the
disk is slow or full, records are dropped and counted rather than blocking
the event loop for long.
"""

from __future__ import annotations

import os
import random
import time

import msgspec

from lb.core.log import log

_encode = msgspec.json.Encoder().encode


class AccessLog:
    __slots__ = ("fd", "path", "every", "countdown", "rng", "buf", "size", "limit", "dropped",
                 "slot")

    def __init__(self, path: str, sample: float, buffer: int, slot: int, seed: int = 0) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.rng = random.Random(seed or None)
        self.every = max(1, round(1 / sample))
        self.countdown = self._next()
        self.buf: list[bytes] = []
        self.size = 0
        self.limit = buffer
        self.dropped = 0
        self.slot = slot

    def _next(self) -> int:
        return 1 if self.every == 1 else self.rng.randint(1, 2 * self.every - 1)

    def record(self, conn, ex) -> None:
        """Called for a sampled response (the caller handled the countdown)."""
        self.countdown = self._next()
        head = ex.head
        sp = head.find(b" ")
        target = head[sp + 1: head.find(b" ", sp + 1)] if sp > 0 else b""
        backend = ex.backend
        now = time.monotonic()
        line = _encode({
            "ts": round(time.time(), 3),
            "client": conn.client_ip.decode(),
            "method": ex.method.decode("latin-1"),
            "target": target.decode("latin-1"),
            "status": ex.status,
            "backend": backend.name if backend is not None else None,
            "upstream_ms": round((now - ex.t0) * 1e3, 3) if ex.t0 else None,
            "request_id": ex.rid.decode("latin-1") if ex.rid else None,
            "class": ex.cls,
            "worker": self.slot,
        }) + b"\n"
        if self.size + len(line) > 4 * self.limit:
            self.dropped += 1  # the disk is not keeping up: shed log lines, not requests
            return
        self.buf.append(line)
        self.size += len(line)
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        data = b"".join(self.buf)
        self.buf = []
        self.size = 0
        try:
            os.write(self.fd, data)
        except OSError as exc:
            self.dropped += data.count(b"\n")
            log("access_log_write_failed", path=self.path, error=exc.strerror or str(exc))

    def reopen(self) -> None:
        """After a rotation (SIGUSR1)."""
        self.flush()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            log("access_log_reopen_failed", path=self.path, error=exc.strerror or str(exc))
            return
        os.close(self.fd)
        self.fd = fd

    def close(self) -> None:
        self.flush()
        os.close(self.fd)
