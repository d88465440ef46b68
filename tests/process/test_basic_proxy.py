"""Plain forwarding: status, body, forwarded headers, both backends used."""

import http.client

from tests.rawhttp import get


def test_get_is_forwarded_with_forwarding_headers(lb, backend):
    status, headers, body = get(lb.port, "/echo?q=1", headers={"X-Custom": "v"})
    assert status == 200
    import json

    seen = json.loads(body)
    assert seen["method"] == "GET"
    assert seen["target"] == "/echo?q=1"
    names = {k.lower(): v for k, v in seen["headers"]}
    assert names["x-custom"] == "v"
    assert names["x-forwarded-for"] == "127.0.0.1"
    assert names["x-forwarded-proto"] == "http"
    assert names["x-forwarded-host"] == f"127.0.0.1:{lb.port}"
    assert names["host"] == f"127.0.0.1:{lb.port}"
    assert seen["http_version"] == "1.1"


def test_existing_x_forwarded_for_is_appended(lb):
    import json

    _, _, body = get(lb.port, "/echo", headers={"X-Forwarded-For": "10.1.2.3"})
    names = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert names["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"


def test_round_robin_uses_every_backend(backend_factory, lb_factory):
    b1, b2 = backend_factory("one"), backend_factory("two")
    lb = lb_factory([b1, b2], strategy="round_robin")
    seen = [get(lb.port, "/")[2] for _ in range(6)]
    assert seen.count(b"backend one\n") == 3
    assert seen.count(b"backend two\n") == 3


def test_upstream_connections_are_pooled(lb, backend):
    c = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    for _ in range(20):
        c.request("GET", "/")
        r = c.getresponse()
        assert r.status == 200 and r.read() == b"backend b1\n"
    c.close()
    # 20 requests over one client connection reuse one upstream connection
    # (the stats call itself is a second, direct connection).
    assert backend.stats() == {"connections": 2, "requests": 20}
