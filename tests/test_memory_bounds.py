"""What a client or a backend can make a worker hold: bounded, and given back.

Each test measures the worker process's RSS (psutil) while real sockets push
far more bytes than the bound allows; the old behaviour grew with those bytes.
"""

from __future__ import annotations

import socket
import threading
import time

import psutil

from tests.conftest import RawConn, ThreadedServer, build_request
from tests.test_streaming import RssSampler, single_worker, warm_up

MiB = 1024 * 1024
RSS_GROWTH_LIMIT = 64 * MiB


def rss(lb) -> int:
    return psutil.Process(single_worker(lb)).memory_info().rss


def assert_bounded(baseline: int, samples: list[int], what: str) -> None:
    assert samples, "no RSS sample taken"
    growth = max(samples) - baseline
    assert growth < RSS_GROWTH_LIMIT, (
        f"{what}: worker RSS grew by {growth / MiB:.1f} MiB "
        f"(baseline {baseline / MiB:.1f} MiB, peak {max(samples) / MiB:.1f} MiB)")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class ScriptedBackend(ThreadedServer):
    """Reads a request head, then sends what `script(conn)` sends; counts the
    bytes it managed to send before lb closed the connection."""

    def __init__(self, script) -> None:
        self.script = script
        self.sent = 0
        self.finished = threading.Event()
        super().__init__()

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        with self.lock:
            self.sent += len(data)

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            self.script(self, conn)
        except OSError:
            pass
        finally:
            conn.close()
            self.finished.set()


def upstream_connections(lb, port: int) -> list:
    """The worker's established TCP connections to a backend port."""
    return [c for c in psutil.Process(single_worker(lb)).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]


def lb_for(lb_factory, server, extra: str = ""):
    return lb_factory([], extra=extra,
                      backend_lines=f'[[backends]]\naddress = "{server.address}"\nname = "scripted"')


def warm(lb) -> int:
    """A few requests (answered 502 or not, the worker's steady state) and the baseline RSS."""
    for _ in range(3):
        with RawConn(lb.port) as c:
            c.send(build_request("GET", "/warm"))
            try:
                c.read_response()
            except (EOFError, OSError):
                pass
    return rss(lb)


# -- item: unbounded response heads and 1xx floods --------------------------------


def flood_1xx(total: int):
    piece = b"HTTP/1.1 100 Continue\r\n\r\n" * 10_000  # 250 KB per send

    def script(server, conn):
        while server.sent < total:
            server.send(conn, piece)
        server.send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    return script


def huge_head(total: int):
    line = b"X-Pad: " + b"p" * 1000 + b"\r\n"
    piece = line * 256  # ~257 KB per send

    def script(server, conn):
        server.send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n")
        while server.sent < total:
            server.send(conn, piece)
        server.send(conn, b"\r\nok\n")
    return script


def test_1xx_flood_gets_502_in_bounded_memory(lb_factory):
    server = ScriptedBackend(flood_1xx(256 * MiB))
    try:
        lb = lb_for(lb_factory, server)
        baseline = rss(lb)
        with RssSampler(single_worker(lb), interval=0.05) as sampler, RawConn(lb.port, timeout=8) as c:
            t0 = time.monotonic()
            resp = c.request("GET", "/")
            elapsed = time.monotonic() - t0
        assert resp.status == 502, resp.head
        assert elapsed < 3, f"502 after {elapsed:.1f}s: the flood was read on"
        assert server.finished.wait(5), "the backend's connection was kept open"
        # lb closed it long before the flood ended (what is left is socket buffers).
        assert server.sent < 32 * MiB, f"backend pushed {server.sent / MiB:.0f} MiB of 1xx"
        assert_bounded(baseline, sampler.samples, "1xx flood")
        assert rss(lb) - baseline < RSS_GROWTH_LIMIT
    finally:
        server.close()


def test_huge_response_head_gets_502_in_bounded_memory(lb_factory):
    server = ScriptedBackend(huge_head(96 * MiB))
    try:
        lb = lb_for(lb_factory, server)
        baseline = rss(lb)
        with RssSampler(single_worker(lb), interval=0.05) as sampler, RawConn(lb.port, timeout=8) as c:
            resp = c.request("GET", "/")
        assert resp.status == 502, resp.head
        assert len(resp.head) < 4096
        assert server.finished.wait(5), "the backend's connection was kept open"
        assert server.sent < 32 * MiB, f"backend pushed {server.sent / MiB:.0f} MiB of head"
        assert_bounded(baseline, sampler.samples, "96 MiB response head")
    finally:
        server.close()


# -- item: an early response must not make the worker buffer the request body -------


class EarlyAnswer(ThreadedServer):
    """Answers `status` as soon as a request head arrives, then stops reading
    (the connection stays open until lb closes it)."""

    def __init__(self, status: int = 401) -> None:
        self.status = status
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            if buf.startswith(b"GET "):  # warm-up requests: one per connection
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                return
            conn.sendall(b"HTTP/1.1 %d Early\r\nContent-Length: 6\r\n\r\nearly\n" % self.status)
            while not self.stopping:  # never reads the body, never closes first
                time.sleep(0.05)
        except OSError:
            pass
        finally:
            conn.close()


def test_early_answer_to_a_200_mb_upload_is_not_buffered(lb_factory):
    server = EarlyAnswer(401)
    total = 200 * MiB
    try:
        lb = lb_for(lb_factory, server)
        baseline = warm(lb)
        s = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
        sent = [0]
        errors = []

        def upload():
            piece = memoryview(b"u" * MiB)
            try:
                s.sendall(build_request("POST", "/upload", {"Content-Length": str(total)}))
                while sent[0] < total:
                    s.sendall(piece)
                    sent[0] += len(piece)
            except OSError as exc:
                errors.append(exc)

        t = threading.Thread(target=upload, daemon=True)
        with RssSampler(single_worker(lb), interval=0.05) as sampler:
            t.start()
            c = RawConn.from_socket(s)
            resp = c.read_response("POST")
            assert resp.status == 401 and resp.body == b"early\n", resp.head
            t.join(20)
            assert not t.is_alive(), f"upload stuck after {sent[0] / MiB:.0f} MiB"
            assert not errors and sent[0] == total, (errors, sent[0])
            assert_bounded(baseline, sampler.samples, "200 MiB upload answered early")
            # The body ended: lb closes, with no second response.
            closed = c.closed_by_peer(5)
        s.close()
        assert closed, "connection kept open after the discarded body"
        assert "close" in resp.connection_tokens(), resp.head
        assert wait_until(lambda: not upstream_connections(lb, server.port), 5), \
            "lb kept the early-answering upstream connection"
        # And given back (nothing was kept): within the bound of the baseline again.
        assert wait_until(lambda: rss(lb) - baseline < RSS_GROWTH_LIMIT, 5)
    finally:
        server.close()
