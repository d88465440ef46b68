"""Client and upstream timeouts, with short configured values.

Timeouts are enforced by a periodic sweep (0.25 s), so every deadline below
allows SLACK seconds beyond the configured value.
"""

from __future__ import annotations

import errno
import select
import socket
import time

import pytest

from tests.rawhttp import get, status_codes

SLACK = 0.6
EARLY = 0.05  # a timeout must not fire noticeably before its configured value


def _connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def wait_closed(sock: socket.socket, limit: float) -> tuple[float | None, bytes]:
    """Read until the peer closes or `limit` seconds pass.

    Returns (seconds until close or None if still open, bytes received)."""
    t0 = time.monotonic()
    got = b""
    sock.settimeout(0.05)
    while time.monotonic() - t0 < limit:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0, got
        if not chunk:
            return time.monotonic() - t0, got
        got += chunk
    return None, got


def trickle_until_closed(sock: socket.socket, payload: bytes, interval: float, limit: float):
    """Send `payload` one byte every `interval` s while reading; stop when the
    peer closes.  Returns (seconds until close or None, bytes received, bytes sent)."""
    sock.setblocking(False)
    t0 = time.monotonic()
    got = b""
    sent = 0
    next_send = t0
    try:
        while time.monotonic() - t0 < limit:
            now = time.monotonic()
            if now >= next_send and sent < len(payload):
                try:
                    sock.send(payload[sent:sent + 1])
                    sent += 1
                except (BrokenPipeError, ConnectionResetError):
                    return time.monotonic() - t0, got, sent
                except BlockingIOError:
                    pass
                next_send = now + interval
            r, _, _ = select.select([sock], [], [], 0.02)
            if r:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    return time.monotonic() - t0, got, sent
                except BlockingIOError:
                    continue
                if not chunk:
                    return time.monotonic() - t0, got, sent
                got += chunk
        return None, got, sent
    finally:
        sock.settimeout(5)


# -- client side ------------------------------------------------------------------------


@pytest.fixture
def short_lb(lb_factory, backend):
    return lb_factory([backend], extra=(
        "[timeouts]\n"
        "client_header = 1.0\n"
        "client_body = 1.0\n"
        "keepalive = 1.0\n"
        "upstream_connect = 1.0\n"
        "upstream_response = 1.0\n"
    ))


def test_slowloris_head_trickled_byte_by_byte_gets_408(short_lb, backend):
    # A head that never ends: an endless stream of header bytes, one every 50 ms.
    payload = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 400
    with _connect(short_lb.port) as s:
        elapsed, got, sent = trickle_until_closed(s, payload, 0.05, limit=5.0)
    assert elapsed is not None, f"connection still open after 5 s ({sent} bytes sent)"
    assert 1.0 - EARLY <= elapsed <= 1.0 + SLACK, elapsed
    assert sent < len(payload)  # it was still sending when lb gave up
    assert status_codes(got) == [408], got[:300]
    assert backend.requests() == []


def test_slowloris_between_header_lines_gets_408(short_lb):
    # Complete header lines, each trickled, the blank line never comes.
    payload = b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(80))
    with _connect(short_lb.port) as s:
        elapsed, got, _ = trickle_until_closed(s, payload, 0.03, limit=5.0)
    assert elapsed is not None
    assert 1.0 - EARLY <= elapsed <= 1.0 + SLACK, elapsed
    assert status_codes(got) == [408], got[:300]


def test_idle_connection_that_sends_nothing_is_closed(short_lb):
    with _connect(short_lb.port) as s:
        elapsed, got = wait_closed(s, 5.0)
    assert elapsed is not None, "silent connection never closed"
    assert 1.0 - EARLY <= elapsed <= 1.0 + SLACK, elapsed
    # closing silently or with a 408 are both acceptable; nothing else is
    assert got == b"" or status_codes(got) == [408], got[:300]


def test_stalled_request_body_is_closed_after_client_body(short_lb, backend):
    head = b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    with _connect(short_lb.port) as s:
        s.sendall(head + b"0123456789")  # 10 of 100 bytes, then silence
        elapsed, got = wait_closed(s, 5.0)
    assert elapsed is not None, "stalled body never timed out"
    assert 1.0 - EARLY <= elapsed <= 1.0 + SLACK, elapsed
    codes = status_codes(got)
    assert codes in ([], [408]), got[:300]
    for rec in backend.requests():
        assert "body_size" not in rec  # the backend never got a complete body


def _slow_upload(port: int, pieces: int, gap: float) -> bytes:
    """POST /drain with a body of `pieces` x 10 bytes, one piece every `gap` s."""
    head = b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (pieces * 10)
    got = b""
    with _connect(port) as s:
        s.sendall(head)
        try:
            for _ in range(pieces):
                time.sleep(gap)
                s.sendall(b"x" * 10)
        except (BrokenPipeError, ConnectionResetError):
            pass  # lb gave up on the request; read what it answered
        s.settimeout(5)
        try:
            while b"sha256" not in got:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except ConnectionResetError:
            pass
    return got


def test_slow_but_steady_body_is_not_timed_out(lb_factory, backend):
    # client_body is the idle time between two reads: 8 pieces 0.4 s apart
    # (3.2 s in all) succeed although the whole body takes longer than client_body.
    lb = lb_factory([backend], extra="[timeouts]\nclient_body = 1.0\n")
    got = _slow_upload(lb.port, 8, 0.4)
    assert status_codes(got) == [200], got[:300]
    assert b'"size":80' in got.replace(b" ", b"")


def test_upstream_response_timer_starts_after_the_request_is_sent(short_lb):
    # upstream_response is "request sent -> first byte": a client still
    # uploading (steadily, within client_body) for longer than upstream_response
    # must not get a 504 because the backend has not answered yet.
    got = _slow_upload(short_lb.port, 8, 0.4)
    assert status_codes(got) == [200], got[:300]
    assert b'"size":80' in got.replace(b" ", b"")


def test_idle_keepalive_connection_is_closed_after_keepalive(short_lb):
    with _connect(short_lb.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b"backend b1\n" not in got:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        assert status_codes(got) == [200]
        elapsed, rest = wait_closed(s, 5.0)
    assert elapsed is not None, "idle keep-alive connection never closed"
    assert 1.0 - EARLY <= elapsed <= 1.0 + SLACK, elapsed
    assert rest == b"" or status_codes(rest) == [408], rest[:300]


def test_keepalive_connection_used_within_timeout_stays_open(short_lb):
    # Requests every 0.5 s keep a connection with keepalive = 1.0 alive for 3 s.
    with _connect(short_lb.port) as s:
        for _ in range(6):
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while b"backend b1\n" not in got:
                chunk = s.recv(65536)
                assert chunk, "closed while in use"
                got += chunk
            assert status_codes(got) == [200]
            time.sleep(0.5)


# -- upstream side ----------------------------------------------------------------------------


def test_upstream_that_never_answers_gives_504(short_lb, backend):
    t0 = time.monotonic()
    status, _, _ = get(short_lb.port, "/hang", timeout=10)
    elapsed = time.monotonic() - t0
    assert status == 504
    assert 1.0 - EARLY <= elapsed <= 1.0 + SLACK, elapsed
    assert [r["target"] for r in backend.requests()] == ["/hang"]


def test_upstream_response_timeout_does_not_hit_fast_responses(short_lb):
    status, _, _ = get(short_lb.port, "/slow/500")
    assert status == 200


class Blackhole:
    """A 127.0.0.1 port where connect() hangs in SYN_SENT.

    A listener with backlog 0 whose accept queue is filled with connections
    that are never accepted: Linux then drops further SYNs, so a new
    connect() neither succeeds nor is refused.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(16):
            c = socket.socket()
            c.setblocking(False)
            err = c.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(c)
            if err not in (0, errno.EINPROGRESS):
                raise RuntimeError(f"unexpected connect error {err}")
            _, w, _ = select.select([], [c], [], 0.3)
            if not w:
                return  # this connect hangs: the queue is full
        raise RuntimeError("could not fill the accept queue")

    def close(self) -> None:
        for c in self.fillers:
            c.close()
        self.listener.close()


@pytest.fixture
def blackhole():
    bh = Blackhole()
    yield bh
    bh.close()


def test_blackhole_really_hangs(blackhole):
    # Check the trick itself, so a failure below is about lb.
    c = socket.socket()
    c.settimeout(0.8)
    with pytest.raises(socket.timeout):
        c.connect(("127.0.0.1", blackhole.port))
    c.close()


def _blackhole_lb(lb_factory, blackhole, extra: str = ""):
    return lb_factory([], backend_lines=(
        f'[[backends]]\naddress = "127.0.0.1:{blackhole.port}"\nname = "hole"\n'
    ), extra="[timeouts]\nupstream_connect = 1.0\nupstream_response = 10.0\n" + extra)


def test_upstream_connect_timeout_gives_504_without_retries(lb_factory, blackhole):
    lb = _blackhole_lb(lb_factory, blackhole, "[upstream]\nretries = 0\n")
    t0 = time.monotonic()
    status, _, _ = get(lb.port, "/", timeout=10)
    elapsed = time.monotonic() - t0
    # A connect that never completes is a timeout (504), not a refusal (502).
    assert status == 504
    assert 1.0 - EARLY <= elapsed <= 1.0 + SLACK, elapsed


def test_upstream_connect_timeout_gives_504_with_default_retries(lb_factory, blackhole):
    # With the default retry budget and a single backend there is no other
    # backend to retry on: the client gets its 504 after upstream_connect.
    lb = _blackhole_lb(lb_factory, blackhole)
    t0 = time.monotonic()
    status, _, _ = get(lb.port, "/", timeout=10)
    elapsed = time.monotonic() - t0
    assert status == 504
    assert 1.0 - EARLY <= elapsed <= 1.0 + SLACK, elapsed


def test_stalled_body_after_an_early_answer_is_closed_without_a_second_response(lb_factory):
    from tests.servers import EarlyAnswer

    server = EarlyAnswer(401)
    try:
        lb = lb_factory([], extra="[timeouts]\nclient_body = 1.0\nkeepalive = 30.0",
                        backend_lines=f'[[backends]]\naddress = "{server.address}"\nname = "early"')
        head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        with _connect(lb.port) as s:
            s.sendall(head + b"x" * 5000)  # then silence
            elapsed, got = wait_closed(s, 6.0)
        assert got.startswith(b"HTTP/1.1 401 "), got[:300]
        assert got.count(b"HTTP/1.") == 1, got[:600]  # no unsolicited 408 after it
        assert b"\r\nConnection: close" in got.partition(b"\r\n\r\n")[0]
        assert elapsed is not None, "connection never closed after the answered, stalled upload"
        assert elapsed <= 1.0 + SLACK, elapsed
    finally:
        server.close()
