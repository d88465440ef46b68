"""What a client or a backend can make a worker hold: bounded, and given back.

Each test measures the worker process's RSS (psutil) while real sockets push
far more bytes than the bound allows; the old behaviour grew with those bytes.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import psutil

from tests.servers import EarlyAnswer
from tests.rawhttp import RawConn, ThreadedServer, build_request, read_head
from tests.supervision import wait_until
from tests.rss import RssSampler, single_worker

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
            buf = read_head(conn)
            if buf is None:
                return
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
        assert elapsed < 6, f"502 after {elapsed:.1f}s: the flood was read on"
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


# -- item: memory multiplied by pipelining and by re-chunking -----------------------


def push(socks: list[socket.socket], payload: bytes, stall: float = 1.0, limit: float = 8.0) -> int:
    """Send `payload` on every socket without blocking, until all is sent or no
    socket made progress for `stall` seconds (lb stopped reading). Returns bytes sent."""
    import select

    left = {s: memoryview(payload) for s in socks}
    for s in socks:
        s.setblocking(False)
    total = 0
    last = time.monotonic()
    end = last + limit
    while left and time.monotonic() < end and time.monotonic() - last < stall:
        _, writable, _ = select.select([], list(left), [], 0.1)
        for s in writable:
            try:
                n = s.send(left[s][:262144])
            except (BlockingIOError, InterruptedError):
                continue
            total += n
            last = time.monotonic()
            left[s] = left[s][n:]
            if not left[s]:
                del left[s]
    return total


def open_clients(lb, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", lb.port), timeout=5) for _ in range(n)]


def pipelined_gets(extra_header: bytes) -> bytes:
    one = b"GET /hang HTTP/1.1\r\nHost: x\r\n" + extra_header + b"\r\n"
    return one * (256 * 1024 // len(one))


def client_connections(lb) -> int:
    """Client connections the worker still holds."""
    return sum(1 for c in psutil.Process(single_worker(lb)).net_connections(kind="tcp")
               if c.laddr and c.laddr.port == lb.port and c.status != psutil.CONN_LISTEN)


def abandon(socks: list[socket.socket]) -> None:
    """Close as an attacker leaving would: a reset, the bytes lb has not read dropped
    (a plain close would wait behind them, unseen by a reader that paused)."""
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


def check_pipelining_bounded(lb, request_bytes: bytes, clients: int) -> None:
    baseline = warm(lb)
    peaks = []
    for _ in range(2):  # the second round must not grow the worker further
        socks = open_clients(lb, clients)
        try:
            with RssSampler(single_worker(lb), interval=0.05) as sampler:
                sent = push(socks, request_bytes)
                # lb has read what it will read: the connections' first requests wait on
                # the backend (it never answers), every later one is queued or unread.
                assert wait_until(lambda: lb_idle_cpu(lb), 5)
            assert sent >= clients * 64 * 1024, f"only {sent} bytes went out"
            assert_bounded(baseline, sampler.samples, f"{clients} x 256 KiB of pipelined requests")
            peaks.append(max(sampler.samples))
        finally:
            abandon(socks)
        # lb lets them go at once (its sweep asks the kernel about paused connections),
        # queued exchanges and unparsed bytes with them.
        assert wait_until(lambda: client_connections(lb) == 0, 5), client_connections(lb)
    assert peaks[1] - peaks[0] < 16 * MiB, \
        f"a second round grew the worker by {(peaks[1] - peaks[0]) / MiB:.1f} MiB more"


def lb_idle_cpu(lb) -> bool:
    """The worker used (almost) no CPU over the last 0.2 s."""
    p = psutil.Process(single_worker(lb))
    a = sum(p.cpu_times()[:2])
    time.sleep(0.2)
    return sum(p.cpu_times()[:2]) - a < 0.02


def test_pipelined_requests_are_parsed_only_as_far_as_the_pipeline_allows(lb_factory, backend):
    # Common requests: the C scanner's path.
    lb = lb_factory([backend], workers=1)
    check_pipelining_bounded(lb, pipelined_gets(b""), 100)


def test_pipelined_requests_on_the_httptools_path_are_bounded_too(lb_factory, backend):
    # A field with a rule sends every request to httptools.
    lb = lb_factory([backend], workers=1)
    check_pipelining_bounded(lb, pipelined_gets(b"Connection: keep-alive\r\n"), 100)


CHUNK_CLIENTS = 16


class Sink(ThreadedServer):
    """Reads a request head, then never reads again nor answers."""

    def handle(self, conn: socket.socket) -> None:
        try:
            buf = read_head(conn)
            if buf is None:
                return
            self.closing.wait()
        except OSError:
            pass
        finally:
            conn.close()


def test_a_client_that_leaves_a_full_pipeline_is_let_go_at_once(lb_factory, backend):
    # Reading is paused while the pipeline is full, so the client's end of file is
    # not read; the sweep asks the kernel, rather than leave the connection (and
    # what it holds) until the in-flight request times out (60 s here).
    lb = lb_factory([backend], workers=1)
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
        s.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n" * 40)
        assert wait_until(lambda: client_connections(lb) == 1, 5)
        assert wait_until(lambda: lb_idle_cpu(lb), 5)
    assert wait_until(lambda: client_connections(lb) == 0, 3), "lb held the departed client's connection"


def test_tiny_chunks_to_a_backend_that_stopped_reading_stay_bounded(lb_factory):
    server = Sink()
    try:
        lb = lb_for(lb_factory, server)
        baseline = rss(lb)  # (a sink answers nothing to warm up with)
        head = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"1\r\nx\r\n" * (MiB // 6)  # 1 MB of one-byte chunks
        socks = open_clients(lb, CHUNK_CLIENTS)
        try:
            with RssSampler(single_worker(lb), interval=0.05) as sampler:
                sent = push(socks, head + body)
                assert wait_until(lambda: lb_idle_cpu(lb), 10)
            assert sent >= CHUNK_CLIENTS * 256 * 1024, f"only {sent / MiB:.1f} MiB went out"
            assert_bounded(baseline, sampler.samples, f"{CHUNK_CLIENTS} x 1 MB of one-byte chunks")
        finally:
            for s in socks:
                s.close()
        assert wait_until(lambda: rss(lb) - baseline < 16 * MiB, 5), \
            f"RSS stayed {(rss(lb) - baseline) / MiB:.1f} MiB above the baseline"
    finally:
        server.close()
