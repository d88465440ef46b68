"""Small scripted backends and a routing probe shared by several tests."""

from __future__ import annotations

import socket
import time

from tests.rawhttp import ThreadedServer, get, read_head, request_heads


def backend_of(body: bytes) -> str:
    assert body.startswith(b"backend "), body
    return body[len(b"backend "):].strip().decode()


def route(port: int, n: int, path: str = "/") -> list[str]:
    out = []
    for _ in range(n):
        status, _, body = get(port, path)
        assert status == 200
        out.append(backend_of(body))
    return out


class SlowServer(ThreadedServer):
    """A keep-alive HTTP/1.1 server that answers every request after `delay` s."""

    def __init__(self, name: str, delay: float) -> None:
        self.name = name
        self.delay = delay
        self.count = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        body = f"backend {self.name}\n".encode()
        try:
            for _ in request_heads(conn, stop=lambda: self.stopping):  # GETs only: no body
                with self.lock:
                    self.count += 1
                time.sleep(self.delay)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        except OSError:
            pass
        finally:
            conn.close()


class EarlyAnswer(ThreadedServer):
    """Answers `status` as soon as a request head arrives, then stops reading
    (the connection stays open until lb closes it)."""

    def __init__(self, status: int = 401) -> None:
        self.status = status
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            buf = read_head(conn)
            if buf is None:
                return
            if buf.startswith(b"GET "):  # warm-up requests: one per connection
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                return
            conn.sendall(b"HTTP/1.1 %d Early\r\nContent-Length: 6\r\n\r\nearly\n" % self.status)
            self.closing.wait()  # never reads the body, never closes first
        except OSError:
            pass
        finally:
            conn.close()
