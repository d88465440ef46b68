"""The admin HTTP server against hostile input, through real sockets: odd
Content-Length values and deeply nested JSON get a 4xx with a JSON error
(never a 500 or a dropped connection), and Host values other than an address,
localhost or a configured name get 421 (DNS rebinding)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.rawhttp import get
from tests.adminharness import AdminProc, base_config


@pytest.fixture(scope="module")
def admin():
    a = AdminProc(base_config(admin={"token": "t", "allowed_hosts": ["lb-admin.internal", "ops.example:8443"]}))
    try:
        yield a
    finally:
        a.cleanup()


def exchange(port: int, data: bytes) -> tuple[int, dict]:
    """Send raw bytes, read until the server closes; (status, JSON body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    finally:
        s.close()
    assert out.startswith(b"HTTP/1.1 "), out[:100]
    head, _, body = out.partition(b"\r\n\r\n")
    return int(out[9:12]), json.loads(body)


def post_route(port: int, body: bytes, host: bytes = b"127.0.0.1") -> tuple[int, dict]:
    return exchange(port, b"POST /api/route HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body)


@pytest.mark.parametrize("value,code", [
    (b"+2", 400),
    (b"-1", 400),
    (b"2, 2", 400),
    (b"0x2", 400),
    (b"\xb2", 400),  # SUPERSCRIPT TWO: str.isdigit() says yes, int() says no
    (b"2\x0b", 400),
    (b"9" * 40, 413),
    (b"99999999", 413),
])
def test_odd_content_length(admin, value, code):
    status, body = exchange(admin.port, b"POST /api/route HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Content-Length: " + value + b"\r\n\r\n{}")
    assert status == code and body["status"] == code and body["error"]


def test_two_content_length_headers(admin):
    for second in (b"2", b"3"):
        status, body = exchange(admin.port, b"POST /api/route HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                b"Content-Length: 2\r\nContent-Length: " + second + b"\r\n\r\n{}")
        assert status == 400 and "content-length" in body["error"].lower()


def test_two_host_headers(admin):
    status, body = exchange(admin.port, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status == 400 and "host" in body["error"]


@pytest.mark.parametrize("doc", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"headers":' * 5_000 + b"{}" + b"}" * 5_000,
])
def test_deeply_nested_json(admin, doc):
    status, body = post_route(admin.port, doc)
    assert status == 400 and "nested too deeply" in body["error"]


@pytest.mark.parametrize("cl", ["\u00b2", "9" * 5000, "+5", "1e3"])
def test_route_odd_declared_length(admin, cl):
    status, body = post_route(admin.port, json.dumps({"path": "/", "headers": {"content-length": cl}}).encode())
    assert status == 400 and "content-length" in body["error"]


def test_strategy_must_be_a_name(admin):
    for value in ([], [1], {"a": 1}, 5):
        data = json.dumps({"strategy": value}).encode()
        status, body = exchange(admin.port, b"POST /api/strategy HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                b"Authorization: Bearer t\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        assert status == 400 and "unknown strategy" in body["error"]
    # and the admin still serves
    assert admin.get("/api/strategy")[2]["pinned_strategy"] is None


@pytest.mark.parametrize("host,ok", [
    ("127.0.0.1:{port}", True),
    ("localhost:{port}", True),
    ("LOCALHOST:{port}", True),
    ("[::1]:{port}", True),
    ("10.1.2.3:19900", True),  # an address behind a port mapping
    ("lb-admin.internal", True),
    ("lb-admin.internal:{port}", True),
    ("ops.example:8443", True),
    ("ops.example:{port}", False),  # configured with another port
    ("evil.example:{port}", False),
    ("evil.example", False),
    ("127.0.0.1.evil.example:{port}", False),
    ("localhost.evil.example", False),
    ("lb-admin.internal.evil.example", False),
    ("", False),
    ("a b", False),
    ("[::1", False),
])
def test_host_header_checked(admin, host, ok):
    value = host.format(port=admin.port).encode()
    for path in (b"/api/backends", b"/metrics", b"/"):
        s = socket.create_connection(("127.0.0.1", admin.port), timeout=5)
        try:
            s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: " + value + b"\r\nConnection: close\r\n\r\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        finally:
            s.close()
        status = int(out[9:12])
        if ok:
            assert status == 200, (host, path, out[:300])
        else:
            assert status == 421, (host, path, out[:300])
            body = json.loads(out.partition(b"\r\n\r\n")[2])
            assert "allowed_hosts" in body["error"] and b"fast" not in out


def test_http10_without_host_is_answered(admin):
    status, body = exchange(admin.port, b"GET /api/health HTTP/1.0\r\n\r\n")
    assert status in (200, 503) and body["live"] is True  # 503: no workers behind this one


def test_default_config_rejects_other_names_and_lb_run_serves_its_address(lb_factory, backend_factory):
    lb = lb_factory([backend_factory("b1")])
    status, _, _ = get(lb.admin_port, "/api/backends", headers={"Host": "rebound.example:%d" % lb.admin_port})
    assert status == 421
    for host in ("127.0.0.1:%d" % lb.admin_port, "localhost:%d" % lb.admin_port):
        status, _, body = get(lb.admin_port, "/api/backends", headers={"Host": host})
        assert status == 200 and json.loads(body)["backends"][0]["name"] == "b1"


def test_allowed_hosts_follows_a_reload(lb_factory, backend_factory):
    import signal

    lb = lb_factory([backend_factory("b1")])
    hdr = {"Host": "dash.example"}
    assert get(lb.admin_port, "/api/health", headers=hdr)[0] == 421
    text = lb.config.read_text().replace("[admin]\n", '[admin]\nallowed_hosts = ["dash.example"]\n')
    lb.config.write_text(text)
    lb.proc.send_signal(signal.SIGHUP)
    lb.log.wait_for("admin_config_reloaded", timeout=15)
    assert get(lb.admin_port, "/api/health", headers=hdr)[0] in (200, 503)


@pytest.mark.parametrize("value", ['["a b"]', '["x:notaport"]', '["evil/x"]', '"single-string"'])
def test_invalid_allowed_hosts_names_file_and_field(tmp_path, value):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[admin]\nallowed_hosts = {value}\n[[backends]]\naddress = "127.0.0.1:9"\n')
    p = subprocess.run([sys.executable, "-m", "lb", "check", "-c", str(cfg)], capture_output=True, cwd=ROOT,
                       timeout=30)
    assert p.returncode == 2, p
    err = (p.stdout + p.stderr).decode()
    assert str(cfg) in err and "admin.allowed_hosts" in err, err


def test_error_answer_to_head_has_no_body(admin):
    s = socket.create_connection(("127.0.0.1", admin.port), timeout=5)
    try:
        s.sendall(b"HEAD /api/health HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    finally:
        s.close()
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 421 "), out[:200]
    assert body == b"", body[:100]
