"""HTTPS for bench/proxy_bench.py: one certificate (ECDSA P-256 or RSA 2048)
made with the openssl command, and each proxy's TLS settings for it, as alike
as the three allow: TLS 1.2 and 1.3, the same TLS 1.2 suites (lb's default),
ALPN http/1.1.  With `resume=False` (the handshake runs) every proxy refuses
session resumption (no tickets, no session cache), so each new connection
costs a full handshake; wrk would otherwise resume every one."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from lb.core.config import TLS_CIPHERS


@dataclass
class BenchTLS:
    kind: str  # "ecdsa" or "rsa"
    cert: str
    key: str
    combined: str  # cert + key in one file (HAProxy)
    resume: bool = True

    def nginx_server(self) -> str:
        lines = [f"        ssl_certificate {self.cert};", f"        ssl_certificate_key {self.key};",
                 "        ssl_protocols TLSv1.2 TLSv1.3;", f"        ssl_ciphers {TLS_CIPHERS};",
                 "        ssl_prefer_server_ciphers on;"]
        if self.resume:
            lines.append("        ssl_session_cache shared:bench:10m;")
        else:
            lines += ["        ssl_session_cache off;", "        ssl_session_tickets off;"]
        return "\n".join(lines)

    def haproxy_bind(self) -> str:
        opts = f" ssl crt {self.combined} alpn http/1.1 ssl-min-ver TLSv1.2 ciphers {TLS_CIPHERS}"
        return opts if self.resume else opts + " no-tls-tickets"

    def haproxy_global(self) -> str:
        return "" if self.resume else "    tune.ssl.cachesize 0"

    def lb_section(self, port: int) -> str:
        return "\n".join(["[tls]", f'listen = "127.0.0.1:{port}"',
                          f"session_tickets = {'true' if self.resume else 'false'}",
                          "[[tls.certificates]]", f'cert = "{self.cert}"', f'key = "{self.key}"'])


def make_certificate(folder: str, kind: str, resume: bool) -> BenchTLS:
    cert, key = os.path.join(folder, f"{kind}.pem"), os.path.join(folder, f"{kind}-key.pem")
    algo = (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if kind == "ecdsa"
            else ["-newkey", "rsa:2048"])
    subprocess.run(["openssl", "req", "-x509", *algo, "-nodes", "-keyout", key, "-out", cert, "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    combined = os.path.join(folder, f"{kind}-combined.pem")
    with open(combined, "wb") as out:
        for path in (cert, key):
            with open(path, "rb") as f:
                out.write(f.read())
    return BenchTLS(kind, cert, key, combined, resume)
