"""Upgrade to a raw tunnel (WebSocket style), and Upgrade headers on ordinary requests."""

import hashlib
import json
import os
import socket
import threading
import time

import psutil

from tests.rawhttp import RawConn, ThreadedServer, build_request

WS_HEADERS = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Protocol": "chat",
}


def open_tunnel(lb) -> RawConn:
    c = RawConn(lb.port)
    c.send(build_request("GET", "/ws", WS_HEADERS))
    resp = c.read_head()
    assert resp.status == 101, resp.head
    assert resp.header("upgrade").lower() == "websocket"
    assert resp.connection_tokens() == {"upgrade"}, resp.head
    assert not c.buf, "bytes after the 101 head before anything was sent"
    return c


def upstream_connections(lb, backend) -> list:
    """The worker's established TCP connections to the backend."""
    out = []
    for pid in lb.worker_pids():
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == backend.port and conn.status == psutil.CONN_ESTABLISHED:
                out.append(conn)
    return out


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_upgrade_gets_101_and_tunnels_both_ways(lb, backend):
    c = open_tunnel(lb)
    try:
        for msg in (b"hello", b"\x00\x01\xff binary \r\n\r\n", b"GET / HTTP/1.1\r\n\r\n", os.urandom(70_000)):
            c.send(msg)
            assert c.read_exact(len(msg)) == msg
    finally:
        c.close()
    seen = backend.requests()[0]
    names = {k.lower(): v for k, v in seen["headers"]}
    assert seen["target"] == "/ws"
    assert names["upgrade"].lower() == "websocket"
    assert "upgrade" in names["connection"].lower()
    assert names["sec-websocket-key"] == WS_HEADERS["Sec-WebSocket-Key"]
    assert names["sec-websocket-version"] == "13"


def test_tunnel_carries_5_mib_intact(lb):
    payload = os.urandom(5 * 1024 * 1024)
    c = open_tunnel(lb)
    errors = []

    def sender():
        try:
            view = memoryview(payload)
            for i in range(0, len(payload), 64 * 1024):
                c.sock.sendall(view[i : i + 64 * 1024])
        except OSError as exc:  # surfaces as a short read below
            errors.append(exc)

    t = threading.Thread(target=sender, daemon=True)
    try:
        t.start()
        echoed = c.read_exact(len(payload))
        t.join(10)
        assert not errors
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        # Still a working tunnel after the bulk transfer.
        c.send(b"ping")
        assert c.read_exact(4) == b"ping"
    finally:
        c.close()


def test_client_half_close_ends_the_tunnel(lb, backend):
    c = open_tunnel(lb)
    try:
        c.send(b"last words")
        assert c.read_exact(10) == b"last words"
        assert len(upstream_connections(lb, backend)) == 1
        c.sock.shutdown(socket.SHUT_WR)
        assert c.closed_by_peer(), "lb kept the client side of the tunnel open"
    finally:
        c.close()
    assert wait_until(lambda: not upstream_connections(lb, backend)), "upstream side of the tunnel stayed open"


def test_client_close_ends_the_tunnel(lb, backend):
    c = open_tunnel(lb)
    c.send(b"abc")
    assert c.read_exact(3) == b"abc"
    assert len(upstream_connections(lb, backend)) == 1
    c.close()
    assert wait_until(lambda: not upstream_connections(lb, backend)), "upstream side of the tunnel stayed open"
    # lb is still fine afterwards.
    with RawConn(lb.port) as c2:
        assert c2.request("GET", "/").body == b"backend b1\n"


def test_upgrade_header_without_connection_upgrade_is_a_normal_request(lb, backend):
    with RawConn(lb.port) as c:
        resp = c.request("GET", "/echo?n=1", {"Upgrade": "websocket", "Sec-WebSocket-Version": "13"})
        assert resp.status == 200, resp.head
        seen = json.loads(resp.body)
        assert "upgrade" not in resp.connection_tokens()
        # An ordinary keep-alive connection: the next request is parsed as HTTP.
        resp = c.request("GET", "/echo?n=2", {"Upgrade": "websocket", "Connection": "keep-alive"})
        assert resp.status == 200
        seen2 = json.loads(resp.body)
    for s in (seen, seen2):
        names = [k.lower() for k, _ in s["headers"]]
        assert "upgrade" not in names, s["headers"]
        assert all("upgrade" not in v.lower() for k, v in s["headers"] if k.lower() == "connection")
    assert seen["target"] == "/echo?n=1" and seen2["target"] == "/echo?n=2"


# -- bytes after an upgrade request wait for the 101 ---------------------------

SMUGGLED = b"DELETE /admin/users/1 HTTP/1.1\r\nHost: internal\r\nContent-Length: 0\r\n\r\n"


class RecordingBackend(ThreadedServer):
    """Answers every upgrade request with a plain 200 (no switch), then records
    everything else the connection carries until lb closes it."""

    def __init__(self) -> None:
        self.received: list[bytes] = []  # per connection, once it has closed
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nno\n")
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.received.append(data)


def test_bytes_after_an_upgrade_refused_with_200_never_reach_the_backend(lb_factory):
    server = RecordingBackend()
    try:
        lb = lb_factory([], backend_lines=f'[[backends]]\naddress = "{server.address}"\nname = "rec"')
        with RawConn(lb.port) as c:
            c.send(build_request("GET", "/ws", WS_HEADERS) + SMUGGLED)
            resp = c.read_response()
            assert resp.status == 200 and resp.body == b"no\n", resp.head
            assert "close" in resp.connection_tokens(), resp.head
            assert c.read_until_close() == b"", "a second response: the held bytes were run as a request"
        # lb closes that upstream connection (no switch: it cannot be reused).
        assert wait_until(lambda: server.received), "lb kept the refused upgrade's upstream connection"
        seen = b"".join(server.received)
        assert seen.startswith(b"GET /ws HTTP/1.1\r\n"), seen[:200]
        assert b"DELETE" not in seen, "bytes after the upgrade request were forwarded before a 101"
    finally:
        server.close()


def test_bytes_sent_with_the_upgrade_request_go_through_the_tunnel_after_101(lb):
    c = RawConn(lb.port)
    try:
        c.send(build_request("GET", "/ws", WS_HEADERS) + SMUGGLED)
        resp = c.read_head()
        assert resp.status == 101, resp.head
        # The backend echoes tunnel bytes: the held bytes arrive once, after the switch.
        assert c.read_exact(len(SMUGGLED)) == SMUGGLED
        c.send(b"more")
        assert c.read_exact(4) == b"more"
    finally:
        c.close()


# -- idle tunnels end -------------------------------------------------------------


def test_idle_tunnel_is_closed_after_tunnel_idle_and_traffic_keeps_it_open(lb_factory, backend):
    lb = lb_factory([backend], extra="[timeouts]\ntunnel_idle = 1.0")
    c = open_tunnel(lb)
    try:
        # Traffic (echoed: both directions) every 0.4 s for 2 s: never idle for 1 s.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            c.send(b"ping")
            assert c.read_exact(4) == b"ping"
            time.sleep(0.4)
        # Then silence: lb closes both sides within the timeout (+ its 0.25 s sweep).
        t0 = time.monotonic()
        assert c.closed_by_peer(5), "idle tunnel never closed"
        assert time.monotonic() - t0 < 1.0 + 0.6
    finally:
        c.close()
    assert wait_until(lambda: not upstream_connections(lb, backend)), "upstream side of the tunnel stayed open"
