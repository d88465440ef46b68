"""TLS test support: a CA made per test (trustme), certificate files, lb's
[tls] section, and clients (the standard library's, `openssl s_client`, curl)."""

from __future__ import annotations

import datetime
import http.client
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import trustme


class CertAuthority:
    """A CA and the files of the certificates it issues, under `folder`."""

    def __init__(self, folder: Path, name: str = "ca") -> None:
        self.folder = folder
        self.name = name
        self.ca = trustme.CA(organization_name=f"lb test {name}")
        self.ca_file = str(folder / f"{name}.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.count = 0

    def issue(self, *names: str, common_name: str | None = None, rsa: bool = False,
              not_after: datetime.datetime | None = None, stem: str = "") -> tuple[str, str]:
        """(cert chain path, key path) for a leaf serving `names`."""
        self.count += 1
        leaf = self.ca.issue_cert(*names, common_name=common_name or names[0], not_after=not_after,
                                  key_type=trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA)
        stem = stem or f"{self.name}-leaf{self.count}"
        cert, key = self.folder / f"{stem}.pem", self.folder / f"{stem}-key.pem"
        cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return str(cert), str(key)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        return ctx


def tls_section(port: int, certs: list[tuple[str, str]], **keys) -> str:
    """lb's [tls] table: listen on `port`, these (cert, key) pairs, more keys as given."""
    lines = ["[tls]", f'listen = "127.0.0.1:{port}"']
    for k, v in keys.items():
        lines.append(f"{k} = {_toml(v)}")
    for cert, key in certs:
        lines += ["[[tls.certificates]]", f'cert = "{cert}"', f'key = "{key}"']
    return "\n".join(lines)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


def https_get(port: int, ctx: ssl.SSLContext, path: str = "/", host: str = "localhost",
              method: str = "GET", timeout: float = 10.0):
    """One request on a new connection to 127.0.0.1:port, SNI and name `host`."""
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout),
                                server_hostname=host)
    try:
        conn.request(method, path, headers={"Host": host})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def s_client(port: int, *args: str, data: bytes = b"", timeout: float = 15.0) -> str:
    """`openssl s_client` against 127.0.0.1:port; its stdout and stderr together.
    With `data` (a request with Connection: close) it reads until lb closes."""
    wait = ["-ign_eof"] if data else []
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *wait, *args],
                       input=data, capture_output=True, timeout=timeout)
    return (r.stdout + r.stderr).decode("latin-1")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def curl(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True,
                          timeout=timeout, env={**os.environ, "SSL_CERT_FILE": "/nonexistent"})


def start_lb(tmp_path, made, backends, tls_text: str, **kw):
    """lb with `tls_text` added to its config, stopped at the end of the test."""
    from tests.conftest import LBProc

    lb = LBProc(tmp_path, backends, extra=tls_text, **kw)
    made.append(lb)
    return lb


def metric(lb, name: str) -> str:
    """The lines of lb's /metrics that start with `name`."""
    from tests.rawhttp import get

    _, _, body = get(lb.admin_port, "/metrics")
    return "\n".join(line for line in body.decode().splitlines() if line.startswith(name))
