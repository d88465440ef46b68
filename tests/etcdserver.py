"""A real etcd for the fleet tests (Debian `etcd-server`, `etcdctl` from
`etcd-client`): one member on 127.0.0.1, its own ports and data directory,
stopped (SIGKILL) and started again on the same ones."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port


class Etcd:
    def __init__(self, tmp: Path) -> None:
        if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
            pytest.skip("etcd is not installed (scripts/test installs etcd-server and etcd-client)")
        self.dir = tmp / "etcd-data"
        self.port = free_port()
        self.peer = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = open(tmp / "etcd.log", "ab")
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.dir),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer}",
             "--initial-cluster", f"t=http://127.0.0.1:{self.peer}"],
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while self.ctl("endpoint", "health", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("etcd did not start")
            time.sleep(0.1)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["etcdctl", "--endpoints", self.url, "--dial-timeout", "1s", *args],
                              env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, check=check,
                              timeout=10)

    def put(self, key: str, value: str) -> None:
        self.ctl("put", key, value)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        self.log.close()
