"""PROXY protocol v1/v2 on the plain and the HTTPS listener: the parser on its
own, then real lb processes behind a client that speaks as an L4 balancer."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import ssl
import struct
import time

import pytest

from tests.conftest import LBProc, free_port
from tests.rawhttp import get
from tests.supervision import wait_until
from tests.tlsutil import CertAuthority, tls_section
from workers.proxyproto import V2_SIGNATURE, BadHeader, parse


def v2(src: str, dst: str = "10.0.0.1", sport: int = 5555, dport: int = 443, command: int = 1,
       tlv: bytes = b"") -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + struct.pack("!HH", sport, dport) + tlv
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


GOOD = [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n", "203.0.113.7"),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 443\r\n", "2001:db8::7"),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
    (v2("198.51.100.9"), "198.51.100.9"),
    (v2("2001:db8::9", "2001:db8::1"), "2001:db8::9"),
    (v2("::ffff:192.0.2.5", "::ffff:10.0.0.1"), "192.0.2.5"),
    (v2("198.51.100.9", tlv=b"\x01\x00\x02h2"), "198.51.100.9"),  # TLVs are skipped
    (v2("198.51.100.9", command=0), None),  # LOCAL: the balancer's own check
    (b"PROXY TCP6 ::ffff:192.0.2.8 ::ffff:10.0.0.1 1 2\r\n", "192.0.2.8"),  # as v2: unmapped
]

BAD = [
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 56324\r\n",
    b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 056324 443\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 443\r\n",
    b"PROXY TCP5 203.0.113.7 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 203.0.113.777 10.0.0.1 1 2\r\n",
    b"PROXY TCP6 fe80::1%a\nX-Evil:1 ::1 1 2\r\n",  # a zone id would carry any byte
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    b"PROXY " + b"x" * 120,
    V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c" + b"\x00" * 12,
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,  # version 1 in a v2 header
    V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # too short for IPv4
    V2_SIGNATURE + b"\x23\x11\x00\x0c" + b"\x00" * 12,  # unknown command
]


@pytest.mark.parametrize("header,addr", GOOD)
def test_parse_good_headers_and_every_prefix_waits(header, addr):
    assert parse(header + b"GET / HTTP/1.1\r\n") == (addr, len(header))
    for i in range(len(header)):
        assert parse(header[:i]) is None, i


@pytest.mark.parametrize("header", BAD)
def test_parse_bad_headers(header):
    with pytest.raises(BadHeader):
        parse(header + b"\r\n" * 4)


# -- real processes -------------------------------------------------------------------


@pytest.fixture
def setup(tmp_path, backend_factory):
    ca = CertAuthority(tmp_path)
    b = backend_factory("b1")
    tls_port = free_port()
    extra = ("proxy_protocol = true\n[timeouts]\nclient_header = 1.0\n"
             + tls_section(tls_port, [ca.issue("localhost")], proxy_protocol=True))
    lb = LBProc(tmp_path, [b], extra=extra)
    yield lb, b, ca, tls_port
    lb.stop()


def _http(port: int, prefix: bytes, target: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(prefix + f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _xff(backend, target: str) -> str:
    rec = backend.wait_request(target)
    return next(v for k, v in rec["headers"] if k.lower() == "x-forwarded-for")


def _tls_in_one_segment(port: int, header: bytes, ctx: ssl.SSLContext, target: str) -> bytes:
    """The PROXY header and the ClientHello in one write (as a balancer may
    send them), then a request over the handshake that follows."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        s.sendall(header + out.read())
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out.pending:
                    s.sendall(out.read())
                data = s.recv(65536)
                assert data, "closed during the handshake"
                inc.write(data)
        if out.pending:
            s.sendall(out.read())
        obj.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        s.sendall(out.read())
        got = b""
        while b"\r\n\r\n" not in got:
            data = s.recv(65536)
            if not data:
                break
            inc.write(data)
            try:
                got += obj.read(65536)
            except ssl.SSLWantReadError:
                pass
        return got
    finally:
        s.close()


def test_client_address_from_the_header_on_both_listeners(setup):
    lb, b, ca, tls_port = setup
    assert b" 200 " in _http(lb.port, GOOD[0][0], "/v1")
    assert _xff(b, "/v1") == "203.0.113.7"
    assert b" 200 " in _http(lb.port, v2("2001:db8::9", "2001:db8::1"), "/v2")
    assert _xff(b, "/v2") == "2001:db8::9"
    assert b" 200 " in _http(lb.port, v2("198.51.100.9", command=0), "/local")
    assert _xff(b, "/local") == "127.0.0.1"  # LOCAL keeps the peer's address
    # HTTPS: the header before the handshake, in its own write and with the ClientHello.
    ctx = ca.client_context()
    with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
        raw.sendall(b"PROXY TCP4 192.0.2.44 10.0.0.1 4000 443\r\n")
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GET /tls-v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert b" 200 " in s.recv(65536)
    rec = b.wait_request("/tls-v1")
    headers = {k.lower(): v for k, v in rec["headers"]}
    assert headers["x-forwarded-for"] == "192.0.2.44" and headers["x-forwarded-proto"] == "https"
    assert b" 200 " in _tls_in_one_segment(tls_port, v2("198.51.100.77"), ctx, "/tls-v2")
    assert _xff(b, "/tls-v2") == "198.51.100.77"


def test_missing_or_late_header_closes_and_counts(setup):
    lb, b, ca, tls_port = setup
    assert _http(lb.port, b"", "/no-header") == b""  # closed, nothing answered
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
        assert s.recv(100) == b""  # nothing sent: closed after client_header
    assert time.monotonic() - t0 < 4
    with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            ca.client_context().wrap_socket(raw, server_hostname="localhost")  # a handshake, no header

    def errors():
        body = get(lb.admin_port, "/metrics")[2].decode()
        m = re.search(r"^lb_proxy_protocol_errors_total (\S+)", body, re.M)
        return m and float(m.group(1)) >= 3

    assert wait_until(errors, 5)
    assert lb.log.events("proxy_protocol_error")
    assert not any(r["target"] == "/no-header" for r in b.requests())
    # The listener still serves proper connections.
    assert b" 200 " in _http(lb.port, GOOD[0][0], "/after")
    assert json.loads(get(lb.admin_port, "/api/health")[2])["ready"]
