"""Client-side keep-alive, pipelining, HTTP/1.0 and Connection: close handling."""

import json

from tests.rawhttp import RawConn, build_request, chunk_body


def echo(resp) -> dict:
    assert resp.status == 200, resp.head
    return json.loads(resp.body)


def test_many_requests_share_one_client_and_one_upstream_connection(lb, backend):
    with RawConn(lb.port) as c:
        for i in range(30):
            resp = c.request("GET", f"/echo?n={i}")
            assert echo(resp)["target"] == f"/echo?n={i}"
            assert "close" not in resp.connection_tokens()
        # Mixed methods, bodies and response framings on the same connection.
        resp = c.request("POST", "/echo?n=post", body=b"a" * 1000)
        assert echo(resp)["body_size"] == 1000
        resp = c.request("GET", "/bytes/70000")
        assert resp.body == b"x" * 70000
        resp = c.request("GET", "/chunked/70000")
        assert resp.body == b"x" * 70000
        resp = c.request("GET", "/")
        assert resp.body == b"backend b1\n"
    # 34 requests, one upstream connection (plus the direct connection of this stats call).
    assert backend.stats() == {"connections": 2, "requests": 34}


def test_pipelined_gets_are_answered_in_order(lb, backend):
    n = 8
    with RawConn(lb.port) as c:
        c.send(b"".join(build_request("GET", f"/echo?n={i}") for i in range(n)))
        targets = [echo(c.read_response())["target"] for _ in range(n)]
        assert targets == [f"/echo?n={i}" for i in range(n)]
        # The connection is still usable afterwards.
        assert echo(c.request("GET", "/echo?n=after"))["target"] == "/echo?n=after"
    assert [r["target"] for r in backend.requests()] == [f"/echo?n={i}" for i in range(n)] + ["/echo?n=after"]


def test_pipelined_requests_with_bodies_are_answered_in_order(lb, backend):
    sizes = [0, 1, 1000, 200_000, 17, 70_000, 3]
    batch = []
    for i, size in enumerate(sizes):
        body = bytes([65 + i]) * size
        if i % 2:
            # Odd ones chunked (in several pieces), even ones with Content-Length.
            pieces = [body[j : j + 4096] for j in range(0, len(body), 4096)]
            batch.append(build_request("POST", f"/echo?n={i}", {"Transfer-Encoding": "chunked"},
                                       chunk_body(pieces)))
        else:
            batch.append(build_request("POST", f"/echo?n={i}", {"Content-Length": str(size)}, body))
    with RawConn(lb.port) as c:
        c.send(b"".join(batch))
        seen = [echo(c.read_response()) for _ in sizes]
    assert [s["target"] for s in seen] == [f"/echo?n={i}" for i in range(len(sizes))]
    assert [s["body_size"] for s in seen] == sizes


def test_long_pipeline_with_slow_head_keeps_order(lb):
    # The first request is slow; the fast ones behind it must still come back after it.
    batch = [build_request("GET", "/slow/300?n=0")]
    batch += [build_request("GET", f"/echo?n={i}") for i in range(1, 40)]
    with RawConn(lb.port) as c:
        c.send(b"".join(batch))
        first = c.read_response()
        assert first.status == 200 and first.body == b"backend b1\n"
        targets = [echo(c.read_response())["target"] for _ in range(1, 40)]
    assert targets == [f"/echo?n={i}" for i in range(1, 40)]


def test_http10_request_is_answered_and_closed(lb):
    with RawConn(lb.port) as c:
        resp = c.request("GET", "/echo?v=10", {"Host": "lb.test"}, version="1.0")
        assert echo(resp)["target"] == "/echo?v=10"
        assert "keep-alive" not in resp.connection_tokens()
        assert c.closed_by_peer(), "lb kept an HTTP/1.0 connection open without keep-alive"


def test_http10_request_without_host_is_answered_and_closed(lb):
    # Host is optional in HTTP/1.0.
    with RawConn(lb.port) as c:
        resp = c.request("GET", "/echo?v=10", version="1.0")
        assert resp.status == 200, resp.head
        assert echo(resp)["target"] == "/echo?v=10"
        assert c.closed_by_peer()


def test_http10_keep_alive_with_content_length_stays_open(lb, backend):
    with RawConn(lb.port) as c:
        for i in range(3):
            resp = c.request("GET", f"/echo?n={i}", {"Host": "lb.test", "Connection": "keep-alive"},
                             version="1.0")
            assert echo(resp)["target"] == f"/echo?n={i}"
            assert resp.header("content-length") == str(len(resp.body))
            assert resp.connection_tokens() == {"keep-alive"}, resp.head
        resp = c.request("GET", "/bytes/5000", {"Host": "lb.test", "Connection": "keep-alive"}, version="1.0")
        assert resp.body == b"x" * 5000 and resp.connection_tokens() == {"keep-alive"}
    assert len(backend.requests()) == 4


def test_http10_keep_alive_without_content_length_is_closed(lb):
    # The backend answers chunked: an HTTP/1.0 client can only get it close-delimited.
    with RawConn(lb.port) as c:
        resp = c.request("GET", "/chunked/5000", {"Host": "lb.test", "Connection": "keep-alive"},
                         version="1.0")
        assert resp.status == 200
        assert resp.values("transfer-encoding") == []
        assert "keep-alive" not in resp.connection_tokens()
        assert resp.body == b"x" * 5000
        assert c.closed_by_peer(0.1)  # read_body read up to the close already


def test_connection_close_from_http11_client(lb, backend):
    with RawConn(lb.port) as c:
        assert echo(c.request("GET", "/echo?n=1"))["target"] == "/echo?n=1"
        resp = c.request("GET", "/echo?n=2", {"Connection": "close"})
        assert echo(resp)["target"] == "/echo?n=2"
        assert "close" in resp.connection_tokens(), resp.head
        assert c.closed_by_peer()


def test_requests_pipelined_after_connection_close_are_not_processed(lb, backend):
    with RawConn(lb.port) as c:
        c.send(build_request("GET", "/echo?n=1", {"Connection": "close"}) + build_request("GET", "/echo?n=2"))
        resp = c.read_response()
        assert echo(resp)["target"] == "/echo?n=1"
        assert "close" in resp.connection_tokens()
        assert c.closed_by_peer()
    assert [r["target"] for r in backend.requests()] == ["/echo?n=1"]


def test_backend_connection_close_keeps_client_connection(lb, backend):
    with RawConn(lb.port) as c:
        for i in range(3):
            resp = c.request("GET", "/close")
            assert resp.status == 200 and resp.body == b"closing\n"
            assert "close" not in resp.connection_tokens(), resp.head
            resp = c.request("GET", f"/echo?n={i}")
            assert echo(resp)["target"] == f"/echo?n={i}"
    assert [r["target"] for r in backend.requests()] == ["/close", "/echo?n=0", "/close", "/echo?n=1",
                                                         "/close", "/echo?n=2"]


def test_pipeline_deeper_than_the_parse_ahead_is_answered_whole_and_in_order(lb, backend):
    # Far more requests in one write than lb parses ahead (it keeps the rest
    # unparsed until the pipeline has room), on both parse paths, with bodies
    # (Content-Length and chunked) between them: every one answered, in order.
    batch = []
    expect = []
    for i in range(300):
        if i % 50 == 7:
            body = b"b" * (1000 + i)
            batch.append(build_request("POST", f"/echo?n={i}", body=body))
            expect.append((f"/echo?n={i}", len(body)))
        elif i % 50 == 31:
            body = b"c" * i
            batch.append(build_request("POST", f"/echo?n={i}", {"Transfer-Encoding": "chunked"},
                                       chunk_body([body[j:j + 1] for j in range(len(body))])))
            expect.append((f"/echo?n={i}", len(body)))
        else:
            # Every third one takes the httptools path (a field with a rule).
            hs = {"Connection": "keep-alive"} if i % 3 == 0 else {}
            batch.append(build_request("GET", f"/echo?n={i}", hs))
            expect.append((f"/echo?n={i}", 0))
    with RawConn(lb.port) as c:
        c.send(b"".join(batch))
        seen = [echo(c.read_response()) for _ in expect]
        assert echo(c.request("GET", "/echo?n=after"))["target"] == "/echo?n=after"
    assert [(s["target"], s["body_size"]) for s in seen] == expect


def test_parse_ahead_stopping_inside_a_request_line_loses_nothing(lb, backend):
    # httptools is fed 8 KiB at a time and stops at a slice boundary once 16
    # requests wait: here the boundary (byte 8192) falls inside a request line.
    one = b"GET /echo?n=%04d HTTP/1.1\r\nHost: lb.test\r\nConnection: keep-alive\r\n\r\n"
    size = len(one % 0)
    n = 400
    pad = (8192 - 5) % size  # the request at the boundary starts 5 bytes before it
    while pad < 120:
        pad += size
    first = b"GET /echo?n=pad HTTP/1.1\r\nHost: lb.test\r\nConnection: keep-alive\r\nX-Pad: "
    first += b"p" * (pad - len(first) - 4) + b"\r\n\r\n"
    assert len(first) == pad
    data = first + b"".join(one % i for i in range(n))
    assert data[8192 - 5:8192 + 5].startswith(b"GET /")
    with RawConn(lb.port) as c:
        c.send(data)
        seen = [echo(c.read_response())["target"] for _ in range(n + 1)]
    assert seen == ["/echo?n=pad"] + [f"/echo?n={i:04d}" for i in range(n)]
