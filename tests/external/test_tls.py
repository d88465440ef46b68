"""HTTPS at the edge, through real lb processes and real TLS clients (the
standard library's ssl, `openssl s_client`, curl, testssl.sh), with a CA made
for each test (trustme).  TLS to backends, certificates and ticket keys:
tests/process/test_tls_certificates.py."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import time

import pytest

from tests.conftest import free_port
from tests.rawhttp import get
from tests.supervision import wait_until
from tests.tlsutil import curl, have, https_get, metric, s_client, start_lb, tls_section


def test_https_requests_reach_the_backend_with_forwarded_proto(tmp_path, made, ca, backend_factory):
    b = backend_factory("b1")
    port = free_port()
    lb = start_lb(tmp_path, made, [b], tls_section(port, [ca.issue("localhost", "127.0.0.1")]), workers=2)
    ctx = ca.client_context()
    for i in range(4):
        status, _, body = https_get(port, ctx, f"/echo?i={i}")
        assert status == 200, body
    status, _, _ = get(lb.port, "/echo?plain")
    assert status == 200
    recs = {r["target"]: dict((k.lower(), v) for k, v in r["headers"]) for r in b.requests()}
    assert recs["/echo?i=3"]["x-forwarded-proto"] == "https"
    assert recs["/echo?plain"]["x-forwarded-proto"] == "http"
    # Completed handshakes are counted (stats arrive within a report interval),
    # and the admin API and /metrics show the certificate's expiry.
    assert wait_until(lambda: re.search(r"^lb_tls_handshakes_total [4-9]", metric(lb, "lb_tls_handshakes"), re.M), 5)
    status, _, body = get(lb.admin_port, "/api/tls")
    view = json.loads(body)
    assert status == 200 and view["handshakes"] >= 4
    assert view["certificates"][0]["names"] == ["localhost", "127.0.0.1"] or \
        view["certificates"][0]["names"] == ["localhost"]
    assert view["certificates"][0]["expires_in_days"] > 300
    assert 'lb_tls_certificate_expiry_seconds{cert=' in metric(lb, "lb_tls_certificate_expiry")


@pytest.mark.skipif(not have("curl"), reason="curl is not installed")
def test_curl_with_resolve_and_the_test_ca(tmp_path, made, ca, backend_factory):
    b = backend_factory("b1")
    port = free_port()
    start_lb(tmp_path, made, [b], tls_section(port, [ca.issue("www.example.test")]))
    url = f"https://www.example.test:{port}/echo"
    r = curl("--resolve", f"www.example.test:{port}:127.0.0.1", "--cacert", ca.ca_file, "-w", "%{http_code}", url)
    assert r.returncode == 0 and r.stdout.endswith(b"200"), r.stderr
    # Without the CA, curl refuses lb's certificate: a real verification happens.
    r = curl("--resolve", f"www.example.test:{port}:127.0.0.1", url)
    assert r.returncode != 0 and b"certificate" in r.stderr.lower()


@pytest.mark.skipif(not have("openssl"), reason="openssl is not installed")
def test_s_client_versions_alpn_and_sni(tmp_path, made, ca, backend_factory):
    b = backend_factory("b1")
    port = free_port()
    first = ca.issue("default.example.test", common_name="default.example.test")
    exact = ca.issue("api.example.test", common_name="api.example.test")
    wild = ca.issue("*.wild.example.test", common_name="wild")
    lb = start_lb(tmp_path, made, [b], tls_section(port, [first, exact, wild]))
    for version in ("-tls1_2", "-tls1_3"):
        out = s_client(port, version, "-servername", "api.example.test", "-alpn", "h2,http/1.1")
        assert "ALPN protocol: http/1.1" in out, out
        assert "CN = api.example.test" in out, out
    out = s_client(port, "-servername", "x.wild.example.test")
    assert "CN = wild" in out, out
    out = s_client(port, "-servername", "unknown.example.test")  # no match: the first certificate
    assert "CN = default.example.test" in out, out
    # Below TLS 1.2 the handshake fails, and the failure is counted by reason.
    out = s_client(port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert "Cipher is (NONE)" in out or "alert" in out.lower(), out
    assert wait_until(lambda: 'reason="unsupported_protocol"' in metric(lb, "lb_tls_handshake_failures"), 5), \
        metric(lb, "lb_tls_handshake_failures")
    # TLS 1.2 offers forward-secret AEAD suites only.
    out = s_client(port, "-tls1_2", "-cipher", "AES128-SHA:AES256-SHA:AES128-GCM-SHA256")
    assert "Cipher is (NONE)" in out or "handshake failure" in out, out


@pytest.mark.skipif(not have("openssl"), reason="openssl is not installed")
def test_sessions_resume_with_tickets_from_any_worker(tmp_path, made, ca, backend_factory):
    b = backend_factory("b1")
    port = free_port()
    start_lb(tmp_path, made, [b], tls_section(port, [ca.issue("localhost")]), workers=2)
    sess = tmp_path / "session.pem"
    for version in ("-tls1_2", "-tls1_3"):
        out = s_client(port, version, "-sess_out", str(sess), data=b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert "New, " in out, out
        # Each new connection lands on either worker (SO_REUSEPORT): every one resumes.
        for _ in range(6):
            out = s_client(port, version, "-sess_in", str(sess), data=b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert "Reused, " in out, out


def test_handshake_stall_is_timed_out_and_counted(tmp_path, made, ca, backend_factory):
    b = backend_factory("b1")
    port = free_port()
    lb = start_lb(tmp_path, made, [b], tls_section(port, [ca.issue("localhost")], handshake_timeout=0.5))
    pids = lb.worker_pids()
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(5)
    t0 = time.monotonic()
    assert s.recv(100) == b""  # closed by lb, nothing sent by the client
    assert time.monotonic() - t0 < 3
    s.close()
    # Plain HTTP on the HTTPS port is a handshake failure too, and nothing reaches a backend.
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
    s.settimeout(5)
    assert s.recv(100) == b""
    s.close()
    assert wait_until(lambda: 'reason="timeout"' in metric(lb, "lb_tls_handshake_failures")
                      and 'reason="http_request"' in metric(lb, "lb_tls_handshake_failures"), 5), \
        metric(lb, "lb_tls_handshake_failures")
    assert b.requests() == []
    assert lb.proc.poll() is None and lb.worker_pids() == pids  # no worker died of it


def test_plain_listener_redirects_to_https(tmp_path, made, ca, backend_factory):
    b = backend_factory("b1")
    port = free_port()
    lb = start_lb(tmp_path, made, [b], tls_section(port, [ca.issue("localhost")], redirect_http=True))
    # An upload that asks for 100 Continue gets its 308 at once, no 100 first.
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
        s.sendall(b"PUT /up HTTP/1.1\r\nHost: a.example.test\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 308 ") and b"Location: https://a.example.test:%d/up" % port in head
    status, headers, body = get(lb.port, "/a/b?c=1", headers={"Host": "shop.example.test:8080"})
    assert status == 301
    assert headers["Location"] == f"https://shop.example.test:{port}/a/b?c=1"
    status, headers, _ = get(lb.port, "/form", method="POST", body=b"x=1",
                             headers={"Host": "shop.example.test"})
    assert status == 308 and headers["Location"] == f"https://shop.example.test:{port}/form"
    assert b.requests() == []  # nothing is forwarded from the plain listener
    status, _, _ = https_get(port, ca.client_context(), "/a/b")
    assert status == 200
    # redirect_port: the port clients reach (an L4 balancer in front), 443 left out.
    lb2 = start_lb(tmp_path, made, [b], tls_section(free_port(), [ca.issue("localhost")], redirect_http=True,
                                                    redirect_port=443))
    status, headers, _ = get(lb2.port, "/x", headers={"Host": "shop.example.test"})
    assert status == 301 and headers["Location"] == "https://shop.example.test/x"


@pytest.mark.skipif(not have("testssl"), reason="testssl.sh is not installed (Debian package testssl.sh)")
def test_testssl_finds_nothing_weak(tmp_path, made, ca, backend_factory):
    """testssl.sh on protocols (-p), cipher categories (-s), forward secrecy (-f)
    and known attacks (-U): every finding OK or informational."""
    b = backend_factory("b1")
    port = free_port()
    start_lb(tmp_path, made, [b], tls_section(port, [ca.issue("localhost")]))
    out = tmp_path / "testssl.json"
    r = subprocess.run(["testssl", "--quiet", "--color", "0", "--warnings", "off", "-p", "-s", "-f", "-U",
                        "--jsonfile", str(out), f"127.0.0.1:{port}"],
                       capture_output=True, timeout=180, stdin=subprocess.DEVNULL)
    findings = json.loads(out.read_text())
    severities = {f["id"]: f["severity"] for f in findings}
    bad = {f["id"]: (f["severity"], f["finding"]) for f in findings if f["severity"] not in ("OK", "INFO")}
    assert bad == {}, (bad, r.stdout[-2000:])
    for must in ("SSLv3", "TLS1_2", "TLS1_3", "cipherlist_LOW", "PFS", "heartbleed", "ROBOT",
                 "secure_client_renego", "CRIME_TLS", "SWEET32", "LUCKY13", "BEAST", "RC4"):
        assert severities.get(must) == "OK", (must, severities.get(must))
    assert severities.get("TLS1") == "INFO" and severities.get("TLS1_1") == "INFO"  # "not offered"


def _tls_conn(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")


def _read_response(s, buf: bytes) -> tuple[int, dict, bytes, bytes]:
    """One response (Content-Length or chunked) from s; returns status, headers, body, the rest."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, buf
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if status == 101:
        return status, headers, b"", buf
    if "chunked" in headers.get("transfer-encoding", ""):
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += s.recv(65536)
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf += s.recv(65536)
            body, buf = body + buf[:size], buf[size + 2:]
            if size == 0:
                return status, headers, body, buf
    n = int(headers.get("content-length", "0"))
    while len(buf) < n:
        chunk = s.recv(1 << 20)
        assert chunk
        buf += chunk
    return status, headers, buf[:n], buf[n:]


def test_http_semantics_over_tls(tmp_path, made, ca, backend_factory):
    """Pipelining, a large streamed response, a chunked upload, a chunked
    response, HTTP/1.0 and a WebSocket tunnel, all through the HTTPS listener."""
    b = backend_factory("b1")
    port = free_port()
    start_lb(tmp_path, made, [b], tls_section(port, [ca.issue("localhost")]))
    ctx = ca.client_context()
    with _tls_conn(port, ctx) as s:
        s.sendall(b"GET /echo?1 HTTP/1.1\r\nHost: x\r\n\r\nGET /bytes/1048576 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /chunked/70000 HTTP/1.1\r\nHost: x\r\n\r\n")
        st1, _, body1, rest = _read_response(s, b"")
        st2, _, body2, rest = _read_response(s, rest)
        st3, h3, body3, rest = _read_response(s, rest)
        assert (st1, st2, st3) == (200, 200, 200)
        assert json.loads(body1)["target"] == "/echo?1"
        assert len(body2) == 1048576 and len(body3) == 70000 and "chunked" in h3["transfer-encoding"]
        # A chunked upload of 256 KiB, read whole by the backend.
        import hashlib

        data = bytes(range(256)) * 1024
        chunks = b"".join(b"%x\r\n" % 4096 + data[i:i + 4096] + b"\r\n" for i in range(0, len(data), 4096))
        s.sendall(b"POST /drain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
        st, _, body, rest = _read_response(s, rest)
        got = json.loads(body)
        assert st == 200 and got["size"] == len(data) and got["sha256"] == hashlib.sha256(data).hexdigest()
    with _tls_conn(port, ctx) as s:
        s.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        st, h, body, _ = _read_response(s, b"")
        assert st == 200 and json.loads(body)["method"] == "GET"
    with _tls_conn(port, ctx) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        st, _, _, rest = _read_response(s, b"")
        assert st == 101
        s.sendall(b"ping over tls")
        got = rest
        while len(got) < 13:
            got += s.recv(100)
        assert got == b"ping over tls"


def test_cap_and_drain_count_connections_still_in_the_handshake(tmp_path, made, ca, backend_factory):
    """A connection accepted but not through its handshake counts against
    max_connections, and a draining worker (reload) waits for it and serves it."""
    b = backend_factory("b1")
    port = free_port()
    lb = start_lb(tmp_path, made, [b], tls_section(port, [ca.issue("localhost")], handshake_timeout=20)
                  + "\n[limits]\nmax_connections = 2")
    ctx = ca.client_context()
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        assert lb.log.wait_for("accept_paused", timeout=5)
        # A third client waits in the listen queue: its handshake does not complete.
        third = socket.create_connection(("127.0.0.1", port), timeout=1)
        with pytest.raises((socket.timeout, TimeoutError)):
            ctx.wrap_socket(third, server_hostname="localhost")
        third.close()
        # Reload: the old worker drains, but keeps the two it accepted and serves them.
        lb.proc.send_signal(1)
        lb.log.wait_for("reload_done", timeout=20)
        for raw in stalled:
            raw.settimeout(10)
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
                status, headers, _, _ = _read_response(s, b"")
                assert status == 200 and headers.get("connection") == "close"
    finally:
        for raw in stalled:
            raw.close()


def test_closed_tls_connections_release_their_memory(tmp_path, made, ca, backend_factory):
    """Each closed TLS connection's SSL state goes with it, not at the next
    collection (a connection and its parser refer to each other)."""
    import psutil

    b = backend_factory("b1")
    port = free_port()
    lb = start_lb(tmp_path, made, [b], tls_section(port, [ca.issue("localhost")]))
    [pid] = lb.worker_pids()
    ctx = ca.client_context()

    def burst(n):
        for _ in range(n):
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                 server_hostname="localhost") as s:
                s.sendall(b"GET /bytes/60000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass

    burst(200)  # warm: pools, caches, allocator arenas
    before = psutil.Process(pid).memory_info().rss
    burst(1200)
    grown = psutil.Process(pid).memory_info().rss - before
    assert grown < 40 * 1024 * 1024, f"worker RSS grew by {grown / 2**20:.0f} MiB over 1200 connections"
