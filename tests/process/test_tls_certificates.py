"""TLS to backends (verification, mTLS, health checks), certificates (config
errors, inspection, reload under HTTPS load) and session ticket keys, through
real lb processes and the standard library's ssl, with a CA made for each
test (trustme).  HTTPS at the edge with real TLS clients: tests/external/test_tls.py."""

from __future__ import annotations

import datetime
import socket
import ssl
import subprocess
import sys
import threading

from lb.core import tls as tlsmod
from lb.core.tickets import TicketKeys
from tests.conftest import ROOT, BackendProc, free_port
from tests.rawhttp import get
from tests.supervision import wait_until
from tests.tlsutil import CertAuthority, https_get, start_lb, tls_section


def test_ticket_keys_are_shared_by_secret_and_rotate(ca):
    """Two contexts with the same secret (two workers) accept each other's tickets;
    another secret does not; a ticket sealed one period ago still resumes, two
    periods ago it does not."""
    cert, key = ca.issue("localhost")
    now = [1_000_000.0]

    def server(secret):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        keys = TicketKeys(secret, 100.0, clock=lambda: now[0])
        assert keys.install(ctx)
        ctx.keys = keys
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen()

        def run():
            while True:
                try:
                    c, _ = ls.accept()
                except OSError:
                    return
                try:
                    with ctx.wrap_socket(c, server_side=True) as s:
                        s.recv(1)
                        s.sendall(b"k")
                except (OSError, ssl.SSLError):
                    pass

        threading.Thread(target=run, daemon=True).start()
        return ls

    secret = bytes(range(32))
    a, b, c = server(secret), server(secret), server(bytes(32))
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        client = ca.client_context()
        client.maximum_version = version

        def connect(ls, session=None):
            with client.wrap_socket(socket.create_connection(ls.getsockname()), server_hostname="localhost",
                                    session=session) as s:
                s.sendall(b"x")
                s.recv(1)
                return s.session, s.session_reused

        now[0] = 1_000_000.0
        session, _ = connect(a)
        assert connect(b, session)[1] is True, version
        assert connect(c, session)[1] is False, version
        now[0] += 100  # the next period: sealed with the previous key, still accepted
        assert connect(b, session)[1] is True, version
        now[0] += 100  # two periods on: a full handshake
        assert connect(b, session)[1] is False, version
    for ls in (a, b, c):
        ls.close()


def test_tls_backend_verified_wrong_ca_and_mtls(tmp_path, made, ca, backend_factory):
    cert, key = ca.issue("backend.example.test")
    good = BackendProc("good", tls={"cert": cert, "key": key, "client_ca": ca.ca_file})
    made.append(good)
    other = CertAuthority(tmp_path, "other")
    cert2, key2 = other.issue("backend.example.test")
    wrong = BackendProc("wrong", tls={"cert": cert2, "key": key2})
    made.append(wrong)
    client_cert, client_key = ca.issue("lb-client.example.test", common_name="lb-client")
    def backends(good_weight: int, wrong_weight: int) -> str:
        return "".join(f'[[backends]]\naddress = "{p.address}"\nname = "{p.name}"\ntls = true\n'
                       f'sni = "backend.example.test"\nweight = {w}\n'
                       for p, w in ((good, good_weight), (wrong, wrong_weight)))

    upstream = (f'[upstream]\ntls_ca = "{ca.ca_file}"\ntls_cert = "{client_cert}"\n'
                f'tls_key = "{client_key}"\nretries = 0\n')
    lb = start_lb(tmp_path, made, [], upstream, backend_lines=backends(1, 0))
    for i in range(3):
        status, _, _ = get(lb.port, f"/echo?{i}")
        assert status == 200
    recs = good.requests()
    assert len(recs) == 3 and recs[0]["client_cert"]["commonName"] == "lb-client"  # mTLS
    # The backend with a certificate from another CA: 502, a clear line, nothing sent.
    lb2 = start_lb(tmp_path, made, [], upstream, backend_lines=backends(0, 1))
    status, _, _ = get(lb2.port, "/nothing-forwarded")
    assert status == 502
    line = lb2.log.wait_for("upstream_tls_failed")[0]
    assert line["backend"] == "wrong" and "certificate verify failed" in line["error"], line
    assert wrong.requests() == []


def test_health_checks_speak_tls(tmp_path, made, ca):
    cert, key = ca.issue("localhost", "127.0.0.1")
    b = BackendProc("hb", tls={"cert": cert, "key": key})
    made.append(b)
    lb = start_lb(tmp_path, made, [], f'[upstream]\ntls_ca = "{ca.ca_file}"\n'
                  "[health]\npath = \"/healthz\"\ninterval = 0.1\ntimeout = 0.1\n",
                  backend_lines=f'[[backends]]\naddress = "{b.address}"\nname = "hb"\ntls = true\n')
    assert wait_until(lambda: any(r["target"] == "/healthz" for r in b.requests()), 5)
    assert lb.log.events("health_change") == []
    assert get(lb.port, "/x")[0] == 200


def test_config_errors_name_the_field(tmp_path, ca):
    cert, key = ca.issue("localhost")
    _, other_key = ca.issue("localhost")
    expired = ca.issue("old.example.test", not_after=datetime.datetime(2020, 1, 1))
    soon = ca.issue("soon.example.test",
                    not_after=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=3))

    def check(tls_text, upstream=""):
        path = tmp_path / "c.toml"
        path.write_text(f'listen = "127.0.0.1:{free_port()}"\n{upstream}\n{tls_text}\n'
                        '[[backends]]\naddress = "127.0.0.1:9"\n')
        return subprocess.run([sys.executable, "-m", "lb", "check", "-c", str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)

    r = check(tls_section(8443, [(cert, other_key)]))
    assert r.returncode == 2 and "tls.certificates[0].key" in r.stderr and "does not match" in r.stderr
    assert "Traceback" not in r.stderr
    r = check(tls_section(8443, [(cert, str(tmp_path / "missing.pem"))]))
    assert r.returncode == 2 and "tls.certificates[0].key" in r.stderr and "missing.pem" in r.stderr
    r = check(tls_section(8443, [(key, key)]))
    assert r.returncode == 2 and "tls.certificates[0].cert" in r.stderr and "not a PEM certificate" in r.stderr
    r = check(tls_section(8443, [expired]))
    assert r.returncode == 2 and "expired" in r.stderr
    r = check(tls_section(8443, [soon]))
    assert r.returncode == 0 and "warning" in r.stderr and "expires in" in r.stderr
    r = check(tls_section(8443, [(cert, key)], ciphers="NOPE-NOTHING"))
    assert r.returncode == 2 and "tls.ciphers" in r.stderr
    r = check("[tls]\nlisten = \"127.0.0.1:8443\"\n")
    assert r.returncode == 2 and "tls.certificates" in r.stderr
    r = check("", upstream=f'[upstream]\ntls_ca = "{key}"\n')
    assert r.returncode == 2 and "upstream.tls_ca" in r.stderr
    # An encrypted key is refused with a reason (never a passphrase prompt).
    enc_key = tmp_path / "enc-key.pem"
    subprocess.run(["openssl", "pkey", "-in", key, "-aes256", "-passout", "pass:secret", "-out", str(enc_key)],
                   check=True, capture_output=True, timeout=30)
    r = check(tls_section(8443, [(cert, str(enc_key))]), upstream="")
    assert r.returncode == 2 and "encrypted" in r.stderr and "tls.certificates[0].key" in r.stderr
    # The same socket spelled twice would split connections between the listeners.
    path = tmp_path / "same.toml"
    path.write_text('listen = "[::]:18443"\n' + tls_section(0, [(cert, key)]).replace(
        '"127.0.0.1:0"', '"[::0]:18443"') + '\n[[backends]]\naddress = "127.0.0.1:9"\n')
    r = subprocess.run([sys.executable, "-m", "lb", "check", "-c", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "must differ from listen" in r.stderr, r.stderr
    r = check(tls_section(8443, [(cert, key)]))
    assert r.returncode == 0, r.stderr
    # `lb run` refuses to start on the same errors, before binding anything.
    path = tmp_path / "c.toml"
    path.write_text(f'listen = "127.0.0.1:{free_port()}"\n{tls_section(free_port(), [(cert, other_key)])}\n'
                    '[[backends]]\naddress = "127.0.0.1:9"\n')
    r = subprocess.run([sys.executable, "-m", "lb", "run", "-c", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "tls.certificates[0].key" in r.stderr and "Traceback" not in r.stderr


def test_certificate_reload_under_https_load(tmp_path, made, ca, backend_factory):
    """SIGHUP with a new certificate: no request fails; new handshakes get the
    new certificate; a bad pair at reload is refused and the old one kept."""
    b = backend_factory("b1")
    port = free_port()
    cert, key = ca.issue("localhost", stem="site")
    lb = start_lb(tmp_path, made, [b], tls_section(port, [(cert, key)]), workers=2)
    ctx = ca.client_context()
    serial = lambda: ssl.DER_cert_to_PEM_cert(_peer_der(port, ctx))  # noqa: E731
    before = serial()
    failures, done = [], threading.Event()
    count = [0]

    def load():
        while not done.is_set():
            try:
                status, _, _ = https_get(port, ctx, "/slow/5")
                if status != 200:
                    failures.append(status)
            except (OSError, ssl.SSLError) as exc:
                failures.append(repr(exc))
            count[0] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: count[0] >= 20, 10)
        ca.issue("localhost", stem="site")  # new pair, same paths
        lb.proc.send_signal(1)
        lb.log.wait_for("reload_done", timeout=20)
        assert wait_until(lambda: serial() != before, 5)
        after = serial()
        # A mismatched pair: refused, the running certificate stays.
        _, other_key = ca.issue("localhost", stem="other")
        (tmp_path / "site-key.pem").write_bytes(open(other_key, "rb").read())
        lb.proc.send_signal(1)
        rejected = lb.log.wait_for("reload_rejected", timeout=20)[0]
        assert "tls.certificates[0].key" in rejected["error"]
        n = count[0]
        wait_until(lambda: count[0] >= n + 20, 10)
    finally:
        done.set()
        for t in threads:
            t.join(10)
    assert failures == [], failures[:5]
    assert serial() == after


def _peer_der(port: int, ctx: ssl.SSLContext) -> bytes:
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                         server_hostname="localhost") as s:
        return s.getpeercert(binary_form=True)


def test_inspect_reads_names_expiry_and_key_type(ca):
    cert, key = ca.issue("a.example.test", "*.b.example.test", rsa=True)
    info = tlsmod.inspect(cert, key, "tls.certificates[0]")
    assert info.names == ["a.example.test", "*.b.example.test"]
    assert info.key_type == "rsa-2048"
    assert info.expires_in() > 86400
