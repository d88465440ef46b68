"""A real DNS server for the discovery tests: dnsmasq (Debian `dnsmasq-base`)
on 127.0.0.1 and a port of its own, answering from files the test rewrites.

A and AAAA records come from a hosts file in a watched directory (dnsmasq
picks a change up through inotify, no restart); SRV records are options, so
changing them means `restart(srv=...)` on the same port.  TTL 1 s.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port


def free_udp_port() -> int:
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Dnsmasq:
    def __init__(self, tmp: Path, hosts: dict[str, list[str]], srv: list[tuple] = ()) -> None:
        if shutil.which("dnsmasq") is None:
            pytest.skip("dnsmasq is not installed (scripts/test installs dnsmasq-base)")
        self.dir = tmp / "dns-hosts"
        self.dir.mkdir(exist_ok=True)
        self.port = free_udp_port()
        self.proc: subprocess.Popen | None = None
        self.set_hosts(hosts)
        self.start(srv)

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_hosts(self, hosts: dict[str, list[str]]) -> None:
        """Replace the A/AAAA records (atomically: dnsmasq never reads half a file)."""
        text = "".join(f"{ip} {name}\n" for name, ips in hosts.items() for ip in ips)
        tmp = self.dir.parent / "hosts.new"
        tmp.write_text(text)
        os.replace(tmp, self.dir / "hosts")

    def start(self, srv: list[tuple] = ()) -> None:
        """srv: (name, target, port, priority, weight) records."""
        args = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                f"--hostsdir={self.dir}", "--local-ttl=1", "--user=root", "--pid-file="]
        args += [f"--srv-host={n},{t},{p},{prio},{w}" for n, t, p, prio, w in srv]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_serving()

    def _wait_serving(self, timeout: float = 10.0) -> None:
        """Until the server answers a query (any answer will do)."""
        import dns.exception
        import dns.message
        import dns.query

        q = dns.message.make_query("ready.test", "A")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.proc.stderr.read().decode()}")
            try:
                dns.query.udp(q, "127.0.0.1", port=self.port, timeout=0.2)
                return
            except (dns.exception.Timeout, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError("dnsmasq does not answer") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

    def restart(self, srv: list[tuple] = ()) -> None:
        self.stop()
        self.start(srv)
