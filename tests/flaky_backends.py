"""Backends whose answer the test switches at run time (threaded, raw sockets)."""

from __future__ import annotations

import socket

from tests.rawhttp import ThreadedServer, request_heads


class SwitchableServer(ThreadedServer):
    """Answers every request with `self.status` (keep-alive), after `self.delay` s."""

    def __init__(self, name: str, status: int = 200, delay: float = 0.0) -> None:
        self.name = name
        self.status = status
        self.delay = delay
        self.hits = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        import time

        conn.settimeout(30)
        try:
            for _ in request_heads(conn):
                with self.lock:
                    self.hits += 1
                if self.delay:
                    time.sleep(self.delay)
                body = b"%d from %s\n" % (self.status, self.name.encode())
                conn.sendall(b"HTTP/1.1 %d X\r\nX-Backend: %s\r\nContent-Length: %d\r\n\r\n%s"
                             % (self.status, self.name.encode(), len(body), body))
        except OSError:
            return
        finally:
            conn.close()
