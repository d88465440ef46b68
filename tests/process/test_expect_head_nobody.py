"""Expect: 100-continue, HEAD, and the responses that never have a body (204, 304)."""

import hashlib
import json
import os

import pytest

from tests.rawhttp import RawConn, build_request, chunk_body

LIMITED = "[limits]\nmax_body_size = 1000"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_expect_100_continue_before_body(lb, backend, framing):
    body = os.urandom(50_000)
    if framing == "chunked":
        headers = {"Transfer-Encoding": "chunked", "Expect": "100-continue"}
        wire = chunk_body([body[:20_000], body[20_000:]])
    else:
        headers = {"Content-Length": str(len(body)), "Expect": "100-continue"}
        wire = body
    with RawConn(lb.port) as c:
        c.send(build_request("POST", "/drain", headers))
        # Nothing of the body has been sent: lb has to invite it.
        interim = c.read_head()
        assert interim.status == 100, interim.head
        assert interim.head.startswith(b"HTTP/1.1 100 Continue\r\n")
        c.send(wire)
        final = c.read_response()
        assert final.status == 200, final.head
        assert json.loads(final.body) == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        # Exactly one interim response: the next request's answer follows directly.
        assert c.request("GET", "/").body == b"backend b1\n"
    assert [r["body_size"] for r in backend.requests()] == [len(body), 0]


def test_expect_100_continue_is_case_insensitive(lb):
    with RawConn(lb.port) as c:
        c.send(build_request("PUT", "/drain", {"Content-Length": "5", "Expect": "100-Continue"}))
        assert c.read_head().status == 100
        c.send(b"hello")
        final = c.read_response()
        assert final.status == 200 and json.loads(final.body)["size"] == 5


def test_expect_with_body_over_limit_gets_413_without_100(backend, lb_factory):
    lb = lb_factory([backend], extra=LIMITED)
    with RawConn(lb.port) as c:
        c.send(build_request("POST", "/drain", {"Content-Length": "5000", "Expect": "100-continue"}))
        resp = c.read_head()
        assert resp.status == 413, resp.head
        assert c.read_body(resp)  # lb's error text
        # The 413 came first (no 100 Continue before it) and nothing follows it.
        assert not c.buf
        c.sock.settimeout(1.0)
        try:
            assert c.sock.recv(4096) == b""
        except (TimeoutError, ConnectionResetError):
            pass
    assert backend.requests() == []


def test_expect_with_body_within_limit_still_continues(backend, lb_factory):
    lb = lb_factory([backend], extra=LIMITED)
    with RawConn(lb.port) as c:
        c.send(build_request("POST", "/drain", {"Content-Length": "1000", "Expect": "100-continue"}))
        assert c.read_head().status == 100
        c.send(b"z" * 1000)
        final = c.read_response()
        assert final.status == 200 and json.loads(final.body)["size"] == 1000


def test_head_has_headers_and_no_body(lb, backend):
    with RawConn(lb.port) as c:
        resp = c.request("HEAD", "/sized/12345")
        assert resp.status == 200
        assert resp.values("content-length") == ["12345"]
        assert resp.values("transfer-encoding") == []
        assert resp.header("content-type") == "text/plain"
        # If lb had sent a body, these bytes would be parsed as the next status line.
        resp = c.request("GET", "/echo?after=head")
        assert resp.status == 200 and json.loads(resp.body)["target"] == "/echo?after=head"
        resp = c.request("GET", "/sized/10")
        assert resp.body == b"s" * 10
    assert [r["method"] for r in backend.requests()] == ["HEAD", "GET", "GET"]


def test_pipelined_head_requests(lb):
    with RawConn(lb.port) as c:
        c.send(build_request("HEAD", "/sized/100") + build_request("HEAD", "/sized/70000")
               + build_request("GET", "/sized/3"))
        first = c.read_response("HEAD")
        second = c.read_response("HEAD")
        third = c.read_response()
        assert first.values("content-length") == ["100"]
        assert second.values("content-length") == ["70000"]
        assert third.status == 200 and third.body == b"sss"


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_status_keeps_connection(lb, status):
    with RawConn(lb.port) as c:
        for _ in range(2):
            resp = c.request("GET", f"/status/{status}")
            assert resp.status == status
            assert resp.values("transfer-encoding") == [], resp.head
            assert resp.values("content-length") in ([], ["0"]), resp.head
            assert "close" not in resp.connection_tokens()
            # The next response must start right after the head: no stray body bytes.
            resp = c.request("GET", "/")
            assert resp.status == 200 and resp.body == b"backend b1\n"


def test_pipelined_no_body_statuses(lb):
    with RawConn(lb.port) as c:
        c.send(build_request("GET", "/status/204") + build_request("GET", "/status/304")
               + build_request("GET", "/status/204") + build_request("GET", "/echo?n=last"))
        assert [c.read_response().status for _ in range(3)] == [204, 304, 204]
        last = c.read_response()
        assert last.status == 200 and json.loads(last.body)["target"] == "/echo?n=last"
