"""Hop-by-hop headers stay on their hop; exactly one framing header crosses lb each way."""

import json

import pytest

from tests.rawhttp import RawConn, ThreadedServer, chunk_body, request_heads

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}


def backend_view(resp) -> tuple[dict, list[str], dict[str, list[str]]]:
    """The /echo answer: (record, header names in order, name -> values), names lower-cased."""
    assert resp.status == 200, resp.head
    seen = json.loads(resp.body)
    names = [k.lower() for k, _ in seen["headers"]]
    values: dict[str, list[str]] = {}
    for k, v in seen["headers"]:
        values.setdefault(k.lower(), []).append(v)
    return seen, names, values


def test_hop_by_hop_request_headers_are_not_forwarded(lb):
    headers = [
        ("Connection", "keep-alive, X-Foo, x-other"),
        ("Keep-Alive", "timeout=5, max=100"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
        ("X-Foo", "1"),
        ("X-OTHER", "2"),
        ("X-Bar", "kept"),
    ]
    head = "GET /echo HTTP/1.1\r\nHost: lb.test\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    with RawConn(lb.port) as c:
        c.send(head.encode())
        seen, names, values = backend_view(c.read_response())
        # The client's keep-alive is honoured on its own hop.
        assert c.request("GET", "/").body == b"backend b1\n"
    leaked = set(names) & (HOP_BY_HOP | {"x-foo", "x-other"})
    assert not leaked, seen["headers"]
    assert values["x-bar"] == ["kept"]
    assert values["x-forwarded-for"] == ["127.0.0.1"]
    assert values["x-forwarded-proto"] == ["http"]
    assert values["x-forwarded-host"] == ["lb.test"]
    assert values["host"] == ["lb.test"]


def test_every_connection_header_line_is_honoured(lb):
    head = (b"GET /echo HTTP/1.1\r\nHost: lb.test\r\nConnection: X-A\r\nConnection: x-b , keep-alive\r\n"
            b"X-A: 1\r\nX-B: 2\r\nX-C: 3\r\n\r\n")
    with RawConn(lb.port) as c:
        c.send(head)
        seen, names, values = backend_view(c.read_response())
    assert "x-a" not in names and "x-b" not in names and "connection" not in names, seen["headers"]
    assert values["x-c"] == ["3"]


def test_forwarded_headers_are_set_by_lb(lb):
    with RawConn(lb.port) as c:
        resp = c.request("GET", "/echo", {"X-Forwarded-For": "10.0.0.1", "X-Forwarded-Proto": "https",
                                          "X-Forwarded-Host": "evil.example"})
        seen, names, values = backend_view(resp)
    assert values["x-forwarded-for"] == ["10.0.0.1, 127.0.0.1"]
    assert values["x-forwarded-proto"] == ["http"]
    assert values["x-forwarded-host"] == ["lb.test"]


def test_hop_by_hop_response_headers_are_not_forwarded(lb):
    with RawConn(lb.port) as c:
        resp = c.request("GET", "/hopbyhop")
        assert resp.status == 200 and resp.body == b"hop\n"
        names = {k for k, _ in resp.headers}
        assert resp.header("x-kept") == "yes"
        assert not names & {"x-secret", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}, resp.head
        assert "x-secret" not in resp.connection_tokens(), resp.head
        # Still the client's keep-alive connection.
        assert "close" not in resp.connection_tokens()
        assert c.request("GET", "/").body == b"backend b1\n"


def test_hop_by_hop_response_headers_to_http10_keep_alive_client(lb):
    with RawConn(lb.port) as c:
        resp = c.request("GET", "/hopbyhop", {"Host": "lb.test", "Connection": "keep-alive"}, version="1.0")
        assert resp.status == 200 and resp.body == b"hop\n"
        names = {k for k, _ in resp.headers}
        assert resp.header("x-kept") == "yes"
        assert not names & {"x-secret", "keep-alive", "proxy-connection"}, resp.head
        assert resp.connection_tokens() <= {"keep-alive", "close"}, resp.head


# -- framing ---------------------------------------------------------------------


def framing(names: list[str]) -> list[str]:
    return [n for n in names if n in ("content-length", "transfer-encoding")]


def test_content_length_request_has_one_framing_header(lb):
    with RawConn(lb.port) as c:
        seen, names, values = backend_view(c.request("POST", "/echo", body=b"q" * 4321))
    assert framing(names) == ["content-length"] and values["content-length"] == ["4321"]
    assert seen["body_size"] == 4321


def test_chunked_request_has_one_framing_header(lb):
    with RawConn(lb.port) as c:
        resp = c.request("POST", "/echo", {"Transfer-Encoding": "chunked"}, chunk_body([b"a" * 10, b"b" * 20]))
        seen, names, values = backend_view(resp)
    assert framing(names) == ["transfer-encoding"] and values["transfer-encoding"] == ["chunked"]
    assert seen["body_size"] == 30


def rejected_or_forwarded(lb, backend, raw: bytes):
    """Send a dubious request: None if lb refused it (and nothing reached the
    backend), else the backend's view of what was forwarded."""
    with RawConn(lb.port) as c:
        c.send(raw)
        resp = c.read_response()
    if resp.status == 400:
        assert backend.requests() == []
        return None
    return backend_view(resp)


def test_request_with_both_framings_is_rejected_or_sent_chunked(lb, backend):
    # RFC 9112 6.3: Transfer-Encoding overrides Content-Length; a proxy must not pass both on.
    raw = (b"POST /echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunk_body([b"hello"]))
    view = rejected_or_forwarded(lb, backend, raw)
    if view is not None:
        seen, names, _values = view
        assert framing(names) == ["transfer-encoding"], seen["headers"]
        assert seen["body_size"] == 5


def test_duplicate_content_length_is_rejected_or_forwarded_once(lb, backend):
    raw = b"POST /echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    view = rejected_or_forwarded(lb, backend, raw)
    if view is not None:
        _seen, names, values = view
        assert framing(names) == ["content-length"] and values["content-length"] == ["5"]


@pytest.mark.parametrize(
    "target, expected",
    [
        ("/bytes/1000", ["content-length"]),
        ("/echo", ["content-length"]),
        ("/chunked/1000", ["transfer-encoding"]),
        ("/nolength/1000", ["transfer-encoding"]),
    ],
)
def test_response_has_one_framing_header(lb, target, expected):
    with RawConn(lb.port) as c:
        resp = c.request("GET", target)
        assert resp.status == 200
        got = [k for k, _ in resp.headers if k in ("content-length", "transfer-encoding")]
        assert got == expected, resp.head
        if expected == ["transfer-encoding"]:
            assert resp.values("transfer-encoding") == ["chunked"]


class NoContentServer(ThreadedServer):
    """Answers every request with a 204 that carries a Content-Length (a common backend slip)."""

    def __init__(self, length: bytes) -> None:
        self.name = "nc"
        self.length = length
        super().__init__()

    def handle(self, conn) -> None:
        conn.settimeout(10)
        try:
            for _ in request_heads(conn):
                conn.sendall(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\ncontent-length: " + self.length
                             + b"\r\nX-B: 2\r\n\r\n")
        except OSError:
            pass
        finally:
            conn.close()


@pytest.mark.parametrize("length", [b"0", b"7"])
def test_no_content_response_carries_no_content_length(lb_factory, length):
    # RFC 9110 8.6: no Content-Length in a 204.  A client that believed one
    # would wait for (or take the next response as) a body that never comes.
    server = NoContentServer(length)
    try:
        lb = lb_factory([server])
        with RawConn(lb.port, timeout=5) as c:
            for _ in range(2):  # the connection stays usable after it
                resp = c.request("GET", "/nc")
                assert resp.status == 204, resp.head
                assert resp.values("content-length") == [], resp.head
                assert resp.values("x-a") == ["1"] and resp.values("x-b") == ["2"], resp.head
    finally:
        server.close()
