"""How upstream failures reach the client: 502/503 mapping and retries."""

from __future__ import annotations

import http.client
import socket
import struct
import time

import pytest

from tests.conftest import free_port
from tests.rawhttp import ThreadedServer, get, read_head, request_heads


class ResettingServer(ThreadedServer):
    """Reads one request head (and its Content-Length body), records its
    request line, then closes the connection with RST without answering."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            buf = read_head(conn)
            if buf is None:
                return
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            while len(rest) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                rest += chunk
            with self.lock:
                self.seen.append(head.split(b"\r\n")[0].decode())
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        finally:
            conn.close()


@pytest.fixture
def resetter():
    srv = ResettingServer()
    yield srv
    srv.close()


def dead_address() -> str:
    """A 127.0.0.1 port with nothing listening (connections are refused)."""
    return f"127.0.0.1:{free_port()}"


def backends_toml(*entries: tuple[str, str, int]) -> str:
    out = []
    for name, address, weight in entries:
        out += ["[[backends]]", f'address = "{address}"', f'name = "{name}"', f"weight = {weight}"]
    return "\n".join(out) + "\n"


# -- refused connections --------------------------------------------------------------


def test_unreachable_backend_gives_502(lb_factory):
    lb = lb_factory([], backend_lines=backends_toml(("dead", dead_address(), 1)))
    for _ in range(3):
        t0 = time.monotonic()
        status, _, body = get(lb.port, "/")
        assert status == 502, body
        assert time.monotonic() - t0 < 2.0  # a refused connect fails fast


def test_one_dead_backend_every_get_succeeds(lb_factory, backend_factory):
    live = backend_factory("live")
    lb = lb_factory([], strategy="round_robin",
                    backend_lines=backends_toml(("dead", dead_address(), 1), ("live", live.address, 1)))
    results = [get(lb.port, f"/item/{i}") for i in range(20)]
    assert [s for s, _, _ in results] == [200] * 20
    assert all(body == b"backend live\n" for _, _, body in results)
    assert len(live.requests()) == 20


def test_one_dead_backend_post_is_retried_after_failed_connect(lb_factory, backend_factory):
    # A connect that failed sent nothing, so even a POST is safe to retry
    # (upstream.retry_connect_non_idempotent defaults to true).
    live = backend_factory("live")
    lb = lb_factory([], strategy="round_robin",
                    backend_lines=backends_toml(("dead", dead_address(), 1), ("live", live.address, 1)))
    for i in range(6):
        status, _, _ = get(lb.port, "/drain", method="POST", body=b"payload %d" % i)
        assert status == 200
    assert [r["method"] for r in live.requests()] == ["POST"] * 6


def test_post_not_retried_when_connect_retry_disabled(lb_factory, backend_factory):
    live = backend_factory("live")
    lb = lb_factory([], strategy="round_robin",
                    extra="[upstream]\nretry_connect_non_idempotent = false\n",
                    backend_lines=backends_toml(("dead", dead_address(), 1), ("live", live.address, 1)))
    statuses = [get(lb.port, "/drain", method="POST", body=b"p")[0] for _ in range(6)]
    assert sorted(set(statuses)) == [200, 502], statuses
    assert len(live.requests()) == statuses.count(200)


# -- resets after the request was sent ----------------------------------------------------


def test_post_reset_after_request_is_502_and_not_retried(lb_factory, backend_factory, resetter):
    live = backend_factory("live")
    lb = lb_factory([], strategy="round_robin",
                    backend_lines=backends_toml(("rst", resetter.address, 1), ("live", live.address, 1)))
    statuses = []
    for i in range(6):
        statuses.append(get(lb.port, "/drain", method="POST", body=b"order %d" % i)[0])
    reset_count = len(resetter.seen)
    assert reset_count >= 1, "round robin never sent a POST to the resetting backend"
    assert statuses.count(502) == reset_count, statuses
    assert statuses.count(200) == 6 - reset_count, statuses
    # every POST went to exactly one backend: none of the reset ones was replayed
    assert len(live.requests()) == 6 - reset_count


def test_post_to_reset_route_is_502_and_other_backend_never_sees_it(lb_factory, backend_factory):
    b1, b2 = backend_factory("one"), backend_factory("two")
    lb = lb_factory([b1, b2], strategy="round_robin")
    status, _, _ = get(lb.port, "/reset", method="POST", body=b"x")
    assert status == 502
    seen = [r for b in (b1, b2) for r in b.requests() if r["target"] == "/reset"]
    assert len(seen) == 1 and seen[0]["method"] == "POST"


def test_get_reset_is_retried_on_the_other_backend(lb_factory, backend_factory, resetter):
    live = backend_factory("live")
    lb = lb_factory([], strategy="round_robin",
                    backend_lines=backends_toml(("rst", resetter.address, 1), ("live", live.address, 1)))
    for i in range(4):
        status, _, body = get(lb.port, f"/page/{i}")
        assert status == 200 and body == b"backend live\n"
    # round robin sends half of the first attempts to the resetting backend;
    # each of those was replayed once on the live one
    assert len(resetter.seen) >= 1
    assert len(set(resetter.seen)) == len(resetter.seen)  # no request hit it twice
    assert set(resetter.seen) <= {f"GET /page/{i} HTTP/1.1" for i in range(4)}
    assert sorted(r["target"] for r in live.requests()) == [f"/page/{i}" for i in range(4)]


def test_get_reset_route_retried_once_on_each_backend(lb_factory, backend_factory):
    # Both backends reset /reset: one attempt each (retries = 1), then 502.
    b1, b2 = backend_factory("one"), backend_factory("two")
    lb = lb_factory([b1, b2], strategy="round_robin")
    status, _, _ = get(lb.port, "/reset")
    assert status == 502
    assert [r["target"] for r in b1.requests()] == ["/reset"]
    assert [r["target"] for r in b2.requests()] == ["/reset"]


def test_retries_zero_disables_get_retry(lb_factory, backend_factory, resetter):
    live = backend_factory("live")
    lb = lb_factory([], strategy="round_robin", extra="[upstream]\nretries = 0\n",
                    backend_lines=backends_toml(("rst", resetter.address, 1), ("live", live.address, 1)))
    statuses = [get(lb.port, f"/p/{i}")[0] for i in range(4)]
    assert statuses.count(502) == len(resetter.seen) >= 1
    assert statuses.count(200) == len(live.requests())


# -- nothing to route to ---------------------------------------------------------------------------


def test_all_weights_zero_gives_503_with_retry_after(lb_factory, backend_factory):
    b1, b2 = backend_factory("one"), backend_factory("two")
    lb = lb_factory([], backend_lines=backends_toml(("one", b1.address, 0), ("two", b2.address, 0)))
    status, headers, _ = get(lb.port, "/")
    assert status == 503
    retry_after = {k.lower(): v for k, v in headers.items()}.get("retry-after")
    assert retry_after is not None and retry_after.strip().isdigit()
    assert b1.requests() == [] and b2.requests() == []


def test_zero_weight_backend_gets_no_traffic(lb_factory, backend_factory):
    b1, b2 = backend_factory("one"), backend_factory("two")
    lb = lb_factory([], backend_lines=backends_toml(("one", b1.address, 0), ("two", b2.address, 1)))
    assert all(get(lb.port, "/")[0] == 200 for _ in range(10))
    assert b1.requests() == []
    assert len(b2.requests()) == 10


# -- pooled connections the backend closed ------------------------------------------------------


def test_pooled_connection_closed_by_backend_is_not_an_error_new_clients(lb_factory, backend_factory):
    b = backend_factory("short", keepalive_timeout=0.5)
    lb = lb_factory([b])
    for i in range(4):
        status, _, body = get(lb.port, f"/n/{i}")
        assert status == 200 and body == b"backend short\n", (i, status)
        time.sleep(1.0)  # the backend closes the idle upstream connection
    assert len(b.requests()) == 4


def test_pooled_connection_closed_by_backend_is_not_an_error_same_client(lb_factory, backend_factory):
    b = backend_factory("short", keepalive_timeout=0.5)
    lb = lb_factory([b])
    c = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    try:
        for i in range(4):
            c.request("GET", f"/s/{i}")
            r = c.getresponse()
            assert r.status == 200 and r.read() == b"backend short\n", (i, r.status)
            time.sleep(1.0)
    finally:
        c.close()
    assert len(b.requests()) == 4


def test_pooled_connection_closed_by_backend_does_not_fail_a_post(lb_factory, backend_factory):
    # A POST is never replayed, so lb must not pick a pooled connection the
    # backend has already closed.
    b = backend_factory("short", keepalive_timeout=0.5)
    lb = lb_factory([b])
    for i in range(4):
        status, _, body = get(lb.port, "/drain", method="POST", body=b"x" * (i + 1))
        assert status == 200, (i, status, body)
        time.sleep(1.0)
    assert [r["body_size"] for r in b.requests()] == [1, 2, 3, 4]


# -- response heads beyond limits.max_response_head -------------------------------------


class OneShotServer(ThreadedServer):
    """Reads a request head and sends `reply` in one write, then closes."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            buf = read_head(conn)
            if buf is None:
                return
            conn.sendall(self.reply)
            conn.recv(1)  # until lb closes
        except OSError:
            pass
        finally:
            conn.close()


def padded_head(status: bytes, size: int, fields: bytes = b"") -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\n" + fields
    return head + b"X-Pad: " + b"p" * (size - len(head) - 11) + b"\r\n\r\n"


@pytest.mark.parametrize("reply, status", [
    # one head over the limit, complete in one read with its body (the C scanner's case)
    (padded_head(b"200 OK", 5000, b"Content-Length: 2\r\n") + b"ok", 502),
    # informational heads count: 3000 + 3000 bytes
    (padded_head(b"103 Early Hints", 3000) + padded_head(b"200 OK", 3000, b"Content-Length: 2\r\n") + b"ok", 502),
    # under the limit, 1xx included
    (padded_head(b"103 Early Hints", 1000) + padded_head(b"200 OK", 2000, b"Content-Length: 2\r\n") + b"ok", 200),
])
def test_response_head_longer_than_max_response_head_is_502(lb_factory, reply, status):
    srv = OneShotServer(reply)
    try:
        lb = lb_factory([], extra='[limits]\nmax_response_head = "4KiB"',
                        backend_lines=backends_toml(("one", srv.address, 1)))
        got, headers, body = get(lb.port, "/")
        assert got == status
        if status == 200:
            assert body == b"ok" and "X-Pad" in headers
        else:
            assert "X-Pad" not in headers
            assert lb.log.wait_for("upstream_head_too_large")[0]["backend"] == "one"
    finally:
        srv.close()


# -- a connection with bytes after its response is not pooled ------------------------------


class TrailingGarbageServer(ThreadedServer):
    """Answers every request on a connection with a complete response followed,
    in the same write, by the start of a response nobody asked for."""

    def __init__(self) -> None:
        self.connections = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with self.lock:
            self.connections += 1
        conn.settimeout(5)
        try:
            for _ in request_heads(conn):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\nHTTP/1.1 20")
        except OSError:
            pass
        finally:
            conn.close()


def test_connection_with_bytes_after_the_response_is_not_pooled(lb_factory):
    srv = TrailingGarbageServer()
    try:
        lb = lb_factory([], backend_lines=backends_toml(("garbage", srv.address, 1)))
        for _ in range(3):  # separate clients, one after the other
            status, _, body = get(lb.port, "/")
            assert (status, body) == (200, b"ok\n")
        assert srv.connections == 3  # each on a fresh upstream connection
    finally:
        srv.close()
