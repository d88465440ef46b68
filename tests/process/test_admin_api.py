"""The admin JSON API through real sockets: every endpoint, auth, bad input."""

from __future__ import annotations

import json
import socket
import time

import pytest

from lb.core.config import STRATEGIES
from tests.rawhttp import RawConn, build_request
from tests.adminharness import TOKEN, AdminProc, Feeder, base_config, metric_samples, wait_until

BACKENDS = [("fast", 1), ("slow", 2), ("flaky", 1)]
CLASSES = ["default", "upload", "api"]


@pytest.fixture(scope="module")
def env():
    admin = AdminProc()
    feeder = Feeder(admin.runtime, BACKENDS, CLASSES).start()
    try:
        wait_until(lambda: admin.get("/api/health")[0] == 200, timeout=10)
        wait_until(lambda: admin.get("/api/metrics")[2]["window"] >= 1.0, timeout=10)
        yield admin, feeder
    finally:
        feeder.stop()
        admin.cleanup()


def by_name(items: list[dict]) -> dict[str, dict]:
    return {i["name"]: i for i in items}


# -- reads ----------------------------------------------------------------------------


def test_health_ready_and_not_ready(env):
    admin, feeder = env
    status, _, body = admin.get("/api/health")
    assert status == 200 and body["ready"] is True and body["problems"] == []
    assert body["workers_expected"] == 2 and body["workers_ready"] == 2
    assert body["routable_backends"] == ["fast", "slow", "flaky"]
    with feeder.lock:
        feeder.status["workers_ready"] = 1
    try:
        status, _, body = wait_until(lambda: (r := admin.get("/api/health"))[0] == 503 and r)
        assert body["ready"] is False and "1 of 2 workers ready" in body["problems"]
    finally:
        with feeder.lock:
            feeder.status["workers_ready"] = 2
    wait_until(lambda: admin.get("/api/health")[0] == 200)


def test_live_metrics(env):
    admin, _ = env
    status, hdrs, body = admin.get("/api/metrics")
    assert status == 200 and hdrs["Content-Type"] == "application/json"
    b = by_name(body["backends"])
    assert set(b) == {"fast", "slow", "flaky"}
    # The feeder sends 6/3/2 requests per 0.1 s per worker (two workers): at most
    # 120/60/40 per second, less when a loaded machine delays its thread.
    assert 20 < b["fast"]["rps"] < 240 and 10 < b["slow"]["rps"] < 120
    assert abs(sum(x["share"] for x in b.values()) - 1) < 0.01
    assert b["fast"]["share"] > b["slow"]["share"] > b["flaky"]["share"]
    assert 0.1 < b["flaky"]["error_ratio"] < 0.6 and b["fast"]["error_ratio"] == 0
    assert b["fast"]["p50"] < b["slow"]["p50"] and b["fast"]["p99"] >= b["fast"]["p50"]
    assert b["slow"]["inflight"] >= 0 and b["fast"]["ewma"] == pytest.approx(0.004)
    # learned mode: the weights are the table's, averaged over classes
    assert b["fast"]["weight"] == pytest.approx((0.6 + 0.5 + 0.7) / 3, abs=0.01)
    assert body["totals"]["limited"] > 0 and body["connections"] == 10
    assert admin.get("/api/metrics?window=abc")[0] == 400
    assert admin.get("/api/metrics?window=0")[0] == 400
    assert admin.get("/api/metrics?window=2")[0] == 200


def test_route_table(env):
    admin, _ = env
    _, _, r1 = admin.get("/api/route")
    assert r1["strategy"] == "ml" and r1["mode"] == "learned" and r1["reason"] == ""
    t = r1["table"]
    assert t["model_version"] == "test-model-7" and t["stale"] is False and t["age"] < 1.0
    assert t["weights"]["api"] == {"fast": 0.7, "slow": 0.2, "flaky": 0.1}
    assert t["error_weight"] == {"fast": 0.5, "slow": 0.002, "flaky": 0.97}
    assert r1["classes"] == CLASSES and r1["config_weights"] == {"fast": 1, "slow": 2, "flaky": 1}
    time.sleep(0.3)
    _, _, r2 = admin.get("/api/route")
    assert r2["table"]["seq"] > t["seq"]


def explain(admin, method="GET", path="/", headers=None):
    status, _, body = admin.request("POST", "/api/route", {"method": method, "path": path, "headers": headers or {}})
    assert status == 200, body
    return body


def test_route_explain_classes(env):
    admin, _ = env
    big = explain(admin, "POST", "/upload", {"Content-Length": str(100_000)})
    assert big["class"] == "upload" and "upload" in big["class_reason"]
    assert explain(admin, "POST", "/upload", {"Content-Length": "10"})["class"] == "default"
    assert explain(admin, "PUT", "/x", {"Transfer-Encoding": "chunked"})["class"] == "upload"
    api = explain(admin, "GET", "/api/users")
    assert api["class"] == "api" and api["mode"] == "learned"
    assert api["weights"] == {"fast": 0.7, "slow": 0.2, "flaky": 0.1}
    # which backend wins depends on the in-flight counts the harness reports (random);
    # the explanation names the one that gets the most picks, by the workers' rule
    assert api["pick_shares"][api["backend"]] == max(api["pick_shares"].values())
    assert "learned table seq" in api["why"] and "least expected cost" in api["why"]
    assert explain(admin, "get", "/other")["class"] == "default"


@pytest.mark.parametrize("body", [
    {"method": "GET", "path": "no-slash"},
    {"method": "G E T", "path": "/"},
    {"path": "/", "headers": ["a"]},
    {"path": "/", "headers": {"Content-Length": "-5"}},
    {"path": "/", "extra": 1},
    [1, 2],
])
def test_route_explain_bad_input(env, body):
    admin, _ = env
    status, _, resp = admin.request("POST", "/api/route", body)
    assert status == 400 and resp["error"]


def test_backends_listing(env):
    admin, _ = env
    status, _, body = admin.get("/api/backends")
    assert status == 200
    b = by_name(body["backends"])
    assert b["slow"]["address"] == "127.0.0.1:9002" and b["slow"]["config_weight"] == 2
    assert b["fast"]["state"] == "up" and b["fast"]["requests"] > 0
    assert b["flaky"]["errors"] > 0
    assert b["fast"]["table_weights"] == {"default": 0.6, "upload": 0.5, "api": 0.7}


# -- auth and writes ------------------------------------------------------------------------


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/api/backends/fast/drain", None),
    ("POST", "/api/backends/fast/enable", None),
    ("POST", "/api/strategy", {"strategy": "p2c_ewma"}),
])
def test_auth_required(env, method, path, body):
    admin, feeder = env
    status, hdrs, resp = admin.request(method, path, body)
    assert status == 401 and hdrs["WWW-Authenticate"].startswith("Bearer") and resp["error"]
    status, _, resp = admin.request(method, path, body, token="wrong")
    assert status == 403 and "invalid" in resp["error"]
    status, _, resp = admin.request(method, path, body, token=TOKEN[:-1])
    assert status == 403
    time.sleep(0.2)
    assert feeder.control.state.drained == [] and feeder.control.state.pinned_strategy == ""


def test_drain_enable_published_and_visible(env):
    admin, feeder = env
    status, _, body = admin.request("POST", "/api/backends/slow/drain", token=TOKEN)
    assert status == 200 and body == {"backend": "slow", "drained": True, "changed": True}
    try:
        wait_until(lambda: feeder.control.state is not None and feeder.control.state.drained == ["slow"], 3)
        b = by_name(admin.get("/api/backends")[2]["backends"])
        assert b["slow"]["state"] == "drained" and b["slow"]["drained"] is True
        samples = metric_samples(admin.get("/metrics")[2].decode())
        assert samples['lb_backend_drained{backend="slow"}'] == 1
        assert samples['lb_backend_routable{backend="slow"}'] == 0
        assert admin.request("POST", "/api/backends/slow/drain", token=TOKEN)[2]["changed"] is False
        # a drained backend is never the answer of /api/route
        routed = explain(admin, "GET", "/x")
        assert routed["excluded"] == {"slow": "drained"} and "slow" not in routed["weights"]
        assert admin.get("/api/health")[2]["routable_backends"] == ["fast", "flaky"]
    finally:
        status, _, body = admin.request("POST", "/api/backends/slow/enable", token=TOKEN)
    assert status == 200 and body["changed"] is True
    wait_until(lambda: feeder.control.state.drained == [], 3)


def test_strategy_pin_unpin(env):
    admin, feeder = env
    status, _, body = admin.request("POST", "/api/strategy", {"strategy": "p2c_ewma"}, token=TOKEN)
    assert status == 200 and body["strategy"] == "p2c_ewma" and body["pinned_strategy"] == "p2c_ewma"
    try:
        wait_until(lambda: feeder.control.state.pinned_strategy == "p2c_ewma", 3)
        routed = explain(admin, "GET", "/x")
        assert routed["strategy"] == "p2c_ewma" and "ewma x (inflight+1)" in routed["why"]
        assert routed["backend"] == min(routed["scores"], key=routed["scores"].get)
        assert admin.get("/api/route")[2]["pinned_strategy"] == "p2c_ewma"
        assert 'strategy="p2c_ewma"' in admin.get("/metrics")[2].decode()
    finally:
        status, _, body = admin.request("POST", "/api/strategy", {"strategy": None}, token=TOKEN)
    assert status == 200 and body["strategy"] == "ml" and body["pinned_strategy"] is None
    wait_until(lambda: feeder.control.state.pinned_strategy == "", 3)


def test_bad_requests(env):
    admin, _ = env
    status, _, body = admin.request("POST", "/api/strategy", {"strategy": "fastest"}, token=TOKEN)
    assert status == 400 and all(s in body["error"] for s in STRATEGIES)
    status, _, body = admin.request("POST", "/api/strategy", raw_body=b"{not json", token=TOKEN)
    assert status == 400 and "invalid JSON" in body["error"]
    status, _, body = admin.request("POST", "/api/strategy", {"name": "ml"}, token=TOKEN)
    assert status == 400
    status, _, body = admin.request("POST", "/api/strategy", raw_body=b"", token=TOKEN)
    assert status == 400
    status, _, body = admin.request("POST", "/api/backends/nope/drain", token=TOKEN)
    assert status == 404 and "nope" in body["error"]
    status, _, body = admin.request("POST", "/api/route", raw_body=b"\xff\xfe")
    assert status == 400
    status, hdrs, body = admin.request("DELETE", "/api/backends")
    assert status == 405 and hdrs["Allow"] == "GET, HEAD, POST"
    status, hdrs, body = admin.request("GET", "/api/backends/fast/drain")
    assert status == 405 and hdrs["Allow"] == "POST"
    status, _, body = admin.request("GET", "/nothing/here")
    assert status == 404 and body["error"]
    status, _, body = admin.request("POST", "/api/route", raw_body=b"x" * (1024 * 1024 + 1))
    assert status == 413


def raw(admin: AdminProc, data: bytes) -> bytes:
    s = socket.create_connection(("127.0.0.1", admin.port), timeout=5)
    try:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    finally:
        s.close()


@pytest.mark.parametrize("data,code", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"POST /api/route HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (b"POST /api/route HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"POST /api/route HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n", 400),
])
def test_malformed_http(env, data, code):
    admin, _ = env
    out = raw(admin, data)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % code), out[:200]
    assert json.loads(body)["status"] == code


H = {"Host": "127.0.0.1"}  # the admin answers addresses, localhost and allowed_hosts (lb.admin.hosts)


def test_keepalive_pipelining_and_head(env):
    admin, _ = env
    with RawConn(admin.port) as c:
        r1 = c.request("GET", "/api/health", H)
        r2 = c.request("GET", "/api/backends", H)
        assert r1.status == 200 and json.loads(r1.body)["ready"] is True
        assert r2.status == 200 and int(r2.header("content-length")) == len(r2.body)
        assert "close" not in r2.connection_tokens()
        c.send(build_request("GET", "/api/route", H) + build_request("POST", "/api/route", H,
               json.dumps({"path": "/api/a"}).encode()) + build_request("HEAD", "/metrics", H))
        a, b, h = c.read_response(), c.read_response(), c.read_response("HEAD")
        assert json.loads(a.body)["strategy"] == "ml" and json.loads(b.body)["class"] == "api"
        assert h.status == 200 and h.body == b"" and int(h.header("content-length")) > 1000
        c.send(build_request("GET", "/api/health", {**H, "Connection": "close"}))
        last = c.read_response()
        assert "close" in last.connection_tokens() and c.closed_by_peer(2)
    # HTTP/1.0 closes unless asked to keep alive; Expect: 100-continue gets its interim answer
    out = raw(admin, b"GET /api/health HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ")
    with RawConn(admin.port) as c:
        body = json.dumps({"path": "/"}).encode()
        c.send(build_request("POST", "/api/route", {**H, "Expect": "100-continue", "Content-Length": str(len(body))}))
        assert c.read_head().status == 100
        c.send(body)
        assert json.loads(c.read_response().body)["class"] == "default"


def test_events_stream(env):
    admin, _ = env
    s = socket.create_connection(("127.0.0.1", admin.port), timeout=5)
    try:
        s.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        buf = b""
        deadline = time.monotonic() + 5
        while buf.count(b"event: snapshot") < 2 and time.monotonic() < deadline:
            buf += s.recv(65536)
    finally:
        s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    assert b"Content-Type: text/event-stream" in head and b"Content-Length" not in head
    events = [e for e in body.split(b"\n\n") if e.startswith(b"event:")]
    kinds = [e.split(b"\n")[0] for e in events]
    assert kinds[0] == b"event: history" and kinds.count(b"event: snapshot") >= 2
    history = json.loads(events[0].split(b"data: ", 1)[1])
    assert history and history[-1]["b"]["fast"]["rps"] > 0
    snap = json.loads(events[1].split(b"data: ", 1)[1])
    assert snap["mode"] == "learned" and snap["model_version"] == "test-model-7"
    assert by_name(snap["live"]["backends"])["fast"]["rps"] > 0 and snap["health"]["ready"] is True


def test_dashboard_page(env):
    admin, _ = env
    status, hdrs, body = admin.get("/")
    assert status == 200 and hdrs["Content-Type"].startswith("text/html")
    assert b"/api/events" in body and b"<canvas" in body
    assert b"http://" not in body and b"https://" not in body  # nothing from the network (offline machines)


# -- token sources, persistence, boot failures -------------------------------------------------


def test_no_token_configured_is_403():
    admin = AdminProc(base_config(admin={"token": ""}))
    try:
        status, _, body = admin.request("POST", "/api/backends/fast/drain", token="anything")
        assert status == 403 and "no admin token configured" in body["error"]
        status, _, _ = admin.request("POST", "/api/backends/fast/drain")
        assert status == 401
    finally:
        admin.cleanup()


def test_token_from_environment():
    admin = AdminProc(base_config(admin={"token": ""}), env={"LB_ADMIN_TOKEN": "from-env"})
    try:
        assert admin.request("POST", "/api/backends/fast/drain", token="from-env")[0] == 200
        assert admin.request("POST", "/api/backends/fast/drain", token=TOKEN)[0] == 403
    finally:
        admin.cleanup()


def test_overrides_survive_restart():
    first = AdminProc()
    try:
        assert first.request("POST", "/api/backends/flaky/drain", token=TOKEN)[0] == 200
        assert first.request("POST", "/api/strategy", {"strategy": "least_connections"}, token=TOKEN)[0] == 200
        assert first.stop() == 0
        second = AdminProc(runtime=first.runtime)
        try:
            b = by_name(second.get("/api/backends")[2]["backends"])
            assert b["flaky"]["state"] == "drained"
            assert second.get("/api/route")[2]["pinned_strategy"] == "least_connections"
        finally:
            second.cleanup()
    finally:
        first.cleanup()


def test_boot_failures_exit_3(tmp_path):
    import subprocess
    import sys

    from tests.adminharness import ROOT

    # garbage config on stdin
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        p = subprocess.run([sys.executable, "-m", "lb.admin", "--runtime", str(tmp_path), "--fd", str(s.fileno())],
                           input=b"\x93garbage", capture_output=True, pass_fds=(s.fileno(),), cwd=ROOT, timeout=20)
    assert p.returncode == 3 and b"admin_boot_failed" in p.stderr and b"invalid config" in p.stderr
    # a descriptor that is not a listening socket
    from lb.core.config import encode, from_dict

    blob = encode(from_dict(base_config()))
    with socket.socket() as s:
        p = subprocess.run([sys.executable, "-m", "lb.admin", "--runtime", str(tmp_path), "--fd", str(s.fileno())],
                           input=blob, capture_output=True, pass_fds=(s.fileno(),), cwd=ROOT, timeout=20)
    assert p.returncode == 3 and b"not a listening TCP socket" in p.stderr
