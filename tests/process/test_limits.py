"""Request size limits, checked through a real lb process and real sockets.

Defaults: request line 8 KiB -> 414, header block 16 KiB -> 431, more than
100 header fields -> 431, body above max_body_size -> 413.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time

import pytest

from tests.rawhttp import get

KIB = 1024


# -- raw helpers -----------------------------------------------------------------


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower().decode()] = v.strip().decode("latin-1")
    return status, headers


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Read one response with a Content-Length (or none: until close) from `sock`."""
    sock.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no complete response head, got {buf[:200]!r}")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a complete response head, got {buf[:200]!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status, headers = _parse_head(head)
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest[:n]
    return status, headers, rest


def send_and_read(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # lb may answer and close before it has read everything
        return read_response(s, timeout)


def request_with_line_length(total: int, port: int) -> bytes:
    """A GET whose request line (without CRLF) is exactly `total` bytes."""
    fixed = len("GET /") + len(" HTTP/1.1")
    path = "/" + "a" * (total - fixed)
    line = f"GET {path} HTTP/1.1"
    assert len(line) == total
    return f"{line}\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


def request_with_headers(port: int, headers: list[tuple[str, str]], path: str = "/echo") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def pad_headers(count: int, value_len: int) -> list[tuple[str, str]]:
    return [(f"X-Pad-{i:03d}", "v" * value_len) for i in range(count)]


# -- default limits ----------------------------------------------------------------


def test_request_line_over_8k_is_414(lb, backend):
    status, _, _ = send_and_read(lb.port, request_with_line_length(8 * KIB + 200, lb.port))
    assert status == 414
    assert backend.requests() == []  # nothing forwarded


def test_request_line_just_under_8k_is_forwarded(lb, backend):
    data = request_with_line_length(8 * KIB - 16, lb.port)
    status, _, body = send_and_read(lb.port, data)
    assert status == 200, body[:200]
    seen = backend.requests()
    assert len(seen) == 1
    assert len(seen[0]["target"]) == 8 * KIB - 16 - len("GET  HTTP/1.1")


def test_header_block_over_16k_is_431(lb, backend):
    # 17 headers of ~1 KiB: ~17.5 KiB of header block, few fields.
    data = request_with_headers(lb.port, pad_headers(17, 1024))
    status, _, _ = send_and_read(lb.port, data)
    assert status == 431
    assert backend.requests() == []


def test_single_huge_header_is_431(lb, backend):
    data = request_with_headers(lb.port, [("X-Big", "z" * (17 * KIB))])
    status, _, _ = send_and_read(lb.port, data)
    assert status == 431
    assert backend.requests() == []


def test_header_block_just_under_16k_is_forwarded(lb, backend):
    hs = pad_headers(15, 1000)  # ~15.2 KiB of header lines
    data = request_with_headers(lb.port, hs)
    head_len = len(data)
    assert head_len < 16 * KIB - 512
    status, _, body = send_and_read(lb.port, data)
    assert status == 200, body[:200]
    seen = json.loads(body)
    names = {k.lower(): v for k, v in seen["headers"]}
    for k, v in hs:
        assert names[k.lower()] == v


def test_more_than_100_header_fields_is_431(lb, backend):
    # Host + 100 others = 101 fields, each tiny (well under the size limit).
    data = request_with_headers(lb.port, pad_headers(100, 1))
    status, _, _ = send_and_read(lb.port, data)
    assert status == 431
    assert backend.requests() == []


def test_exactly_100_header_fields_is_forwarded(lb, backend):
    # Host + 99 others = 100 fields.
    hs = pad_headers(99, 1)
    status, _, body = send_and_read(lb.port, request_with_headers(lb.port, hs))
    assert status == 200, body[:200]
    names = {k.lower() for k, _ in json.loads(body)["headers"]}
    assert {k.lower() for k, _ in hs} <= names


def test_connection_still_usable_after_limit_rejection_on_new_connection(lb, backend):
    # A 431 on one connection does not affect the next client.
    status, _, _ = send_and_read(lb.port, request_with_headers(lb.port, pad_headers(120, 1)))
    assert status == 431
    status, _, body = get(lb.port, "/")
    assert status == 200 and body == b"backend b1\n"


# -- configured limits ---------------------------------------------------------------


@pytest.fixture
def small_lb(lb_factory, backend):
    return lb_factory([backend], extra=(
        "[limits]\n"
        "max_request_line = 1024\n"
        'max_header_size = "2KiB"\n'
        "max_headers = 10\n"
        'max_body_size = "64KiB"\n'
    ))


def test_configured_max_request_line(small_lb, backend):
    status, _, _ = send_and_read(small_lb.port, request_with_line_length(2 * KIB, small_lb.port))
    assert status == 414
    status, _, body = send_and_read(small_lb.port, request_with_line_length(900, small_lb.port))
    assert status == 200, body[:200]
    assert len(backend.requests()) == 1


def test_configured_max_header_size(small_lb, backend):
    status, _, _ = send_and_read(small_lb.port, request_with_headers(small_lb.port, [("X-Big", "z" * 3000)]))
    assert status == 431
    status, _, body = send_and_read(small_lb.port, request_with_headers(small_lb.port, [("X-Ok", "z" * 1000)]))
    assert status == 200, body[:200]


def test_configured_max_headers(small_lb, backend):
    # Host + 10 = 11 fields > 10
    status, _, _ = send_and_read(small_lb.port, request_with_headers(small_lb.port, pad_headers(10, 1)))
    assert status == 431
    # Host + 9 = 10 fields
    status, _, body = send_and_read(small_lb.port, request_with_headers(small_lb.port, pad_headers(9, 1)))
    assert status == 200, body[:200]


def test_content_length_over_max_body_size_is_413_without_reading_body(small_lb, backend):
    head = (
        f"POST /drain HTTP/1.1\r\nHost: 127.0.0.1:{small_lb.port}\r\n"
        f"Content-Length: {64 * KIB + 1}\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", small_lb.port), timeout=5) as s:
        s.sendall(head)  # the body is never sent
        status, _, _ = read_response(s, timeout=3)
    assert status == 413
    assert time.monotonic() - t0 < 2.0  # answered at once, not after waiting for a body
    assert backend.requests() == []


def test_content_length_equal_to_max_body_size_is_forwarded(small_lb, backend):
    body = bytes(range(256)) * 256  # 64 KiB exactly
    status, _, data = get(small_lb.port, "/drain", method="POST", body=body)
    assert status == 200, data[:200]
    assert json.loads(data) == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_chunked_body_growing_past_max_body_size_is_413(small_lb, backend):
    head = (
        f"POST /drain HTTP/1.1\r\nHost: 127.0.0.1:{small_lb.port}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"%x\r\n" % (16 * KIB) + b"c" * (16 * KIB) + b"\r\n"
    with socket.create_connection(("127.0.0.1", small_lb.port), timeout=5) as s:
        s.sendall(head)
        try:
            for _ in range(6):  # 96 KiB > 64 KiB
                s.sendall(chunk)
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        # /drain answers only after the whole body: the response cannot have
        # started, so the client must get a 413.
        status, _, _ = read_response(s, timeout=5)
    assert status == 413
    for rec in backend.requests():
        # the backend never saw a complete body above the limit
        assert rec.get("body_size", 0) <= 64 * KIB


def test_chunked_body_under_max_body_size_is_forwarded(small_lb, backend):
    head = (
        f"POST /drain HTTP/1.1\r\nHost: 127.0.0.1:{small_lb.port}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b"d" * (8 * KIB)
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    with socket.create_connection(("127.0.0.1", small_lb.port), timeout=5) as s:
        s.sendall(head + chunk * 4 + b"0\r\n\r\n")
        status, _, body = read_response(s, timeout=5)
    assert status == 200
    assert json.loads(body) == {"size": 32 * KIB, "sha256": hashlib.sha256(piece * 4).hexdigest()}


def test_default_max_body_size_accepts_20_mib(lb, backend):
    body = hashlib.sha256(b"seed").digest() * (20 * 1024 * 1024 // 32)
    assert len(body) == 20 * 1024 * 1024
    c = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=30)
    try:
        c.request("POST", "/drain", body=body)
        r = c.getresponse()
        data = r.read()
    finally:
        c.close()
    assert r.status == 200, data[:200]
    assert json.loads(data) == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
