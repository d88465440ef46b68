"""What one request leaves behind on its connection, and heads that never end.

Trailer fields of a chunked request are read by llhttp through the same
callback as header fields; they must neither be forwarded nor become part of
the next request's head on the same connection.  An HTTP/0.9 request line
(no version) makes llhttp wait for header fields an HTTP/0.9 client never
sends: it is answered at once instead of at the header timeout.
Both parse paths (with and without the C fast path) are run.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.rawhttp import RawConn

PATHS = {"c": {}, "python": {"LB_NO_FASTPATH": "1"}}
# A header timeout far above the waits below: an answer that comes at all
# comes from the fix, not from the timer.
SLOW_HEADER_TIMEOUT = "[timeouts]\nclient_header = 30"


@pytest.fixture(params=PATHS)
def lb_both(request, lb_factory, backend):
    return lb_factory([backend], extra=SLOW_HEADER_TIMEOUT, env=PATHS[request.param])


def _echo_headers(resp) -> list[tuple[str, str]]:
    assert resp.status == 200, resp.head
    return [(k.lower(), v) for k, v in json.loads(resp.body)["headers"]]


def test_trailer_fields_do_not_reach_the_next_request(lb_both):
    chunked = (b"POST /echo HTTP/1.1\r\nHost: lb.test\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n0\r\nX-Leak: trailer\r\n"
               b"Host: evil.example\r\n\r\n")
    # The next request takes the full path (X-Request-Id has a rule) in the
    # same read and in a later one.
    nxt = b"GET /echo HTTP/1.1\r\nHost: lb.test\r\nX-Request-Id: r2\r\n\r\n"
    for pieces in ([chunked + nxt], [chunked, nxt]):
        with RawConn(lb_both.port, timeout=5) as c:
            for piece in pieces:
                c.send(piece)
                if piece is chunked:
                    first = _echo_headers(c.read_response())
            if len(pieces) == 1:
                first = _echo_headers(c.read_response())
            second = _echo_headers(c.read_response())
        assert ("x-leak", "trailer") not in first
        assert ("x-leak", "trailer") not in second, second
        assert [v for k, v in second if k == "host"] == ["lb.test"], second
        assert not [k for k, _ in second if k in ("transfer-encoding", "content-length")], second


def test_http09_request_is_answered_at_once(lb_both):
    for data in (b"GET /\r\n", b"GET /index.html\r\n", b"GET /\r\nAccept: */*\r\n"):
        s = socket.create_connection(("127.0.0.1", lb_both.port), timeout=5)
        try:
            t0 = time.monotonic()
            s.sendall(data)
            got = b""
            while True:
                chunk = s.recv(65536)  # bounded by the socket timeout (5 s, header timeout 30 s)
                if not chunk:
                    break
                got += chunk
        finally:
            s.close()
        assert got.startswith(b"HTTP/1.1 400 "), (data, got)
        assert time.monotonic() - t0 < 5, data
