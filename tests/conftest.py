"""Real processes on 127.0.0.1: test backends (tests/backend.py) and lb itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import http.client
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening")


class LogReader(threading.Thread):
    """Collects a child's stderr lines (JSON events from lb)."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []
        self.cond = threading.Condition()

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode(errors="replace").rstrip("\n")
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in list(self.lines):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if name is None or ev.get("event") == name:
                out.append(ev)
        return out

    def wait_for(self, name: str, count: int = 1, timeout: float = 15.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                evs = self.events(name)
                if len(evs) >= count:
                    return evs
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {count}x {name!r} in log:\n" + "\n".join(self.lines[-30:]))
                self.cond.wait(left)


class BackendProc:
    def __init__(self, name: str, keepalive_timeout: float | None = None) -> None:
        self.name = name
        self.port = free_port()
        args = [sys.executable, "-m", "tests.backend", "--port", str(self.port), "--name", name]
        if keepalive_timeout is not None:
            args += ["--keepalive-timeout", str(keepalive_timeout)]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        assert line.strip() == b"ready", line

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _get(self, method: str, path: str) -> bytes:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        c.request(method, path)
        body = c.getresponse().read()
        c.close()
        return body

    def requests(self) -> list[dict]:
        return json.loads(self._get("GET", "/__requests"))

    def stats(self) -> dict:
        return json.loads(self._get("GET", "/__stats"))

    def reset(self) -> None:
        self._get("POST", "/__reset")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class LBProc:
    def __init__(self, tmp_path: Path, backends: list[BackendProc], *, strategy: str = "round_robin",
                 workers: int = 1, extra: str = "", backend_lines: str | None = None) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        lines = [
            f'listen = "127.0.0.1:{self.port}"',
            f'strategy = "{strategy}"',
            extra,
            "[admin]",
            f'listen = "127.0.0.1:{self.admin_port}"',
        ]
        if backend_lines is None:
            for b in backends:
                lines += ["[[backends]]", f'address = "{b.address}"', f'name = "{b.name}"']
        else:
            lines.append(backend_lines)
        self.config = tmp_path / f"lb-{self.port}.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lb", "run", "-c", str(self.config), "-w", str(workers)],
            cwd=ROOT, stderr=subprocess.PIPE,
        )
        self.log = LogReader(self.proc.stderr)
        self.log.start()
        self.log.wait_for("worker_ready", workers)

    def worker_pids(self) -> list[int]:
        return [c.pid for c in psutil.Process(self.proc.pid).children() if "workers" in " ".join(c.cmdline())]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def backend_factory():
    made: list[BackendProc] = []

    def make(name: str = "b", **kw) -> BackendProc:
        b = BackendProc(name, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.kill()


@pytest.fixture
def lb_factory(tmp_path):
    made: list[LBProc] = []

    def make(backends, **kw) -> LBProc:
        lb = LBProc(tmp_path, backends, **kw)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.stop()


@pytest.fixture
def backend(backend_factory):
    return backend_factory("b1")


@pytest.fixture
def lb(lb_factory, backend):
    return lb_factory([backend])


# -- raw socket helpers --------------------------------------------------------


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0, until_close: bool = True) -> bytes:
    """Send raw bytes; return everything read until the server closes (or timeout)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not until_close:
                break
        return b"".join(chunks)
    finally:
        s.close()


def status_codes(raw: bytes) -> list[int]:
    """Status codes of the responses in a raw byte stream (heads only, naive)."""
    codes = []
    for line in raw.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and len(line) >= 12 and line[9:12].isdigit():
            codes.append(int(line[9:12]))
    return codes


def get(port: int, path: str = "/", method: str = "GET", body: bytes | None = None, headers=None,
        timeout: float = 10.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


os.environ.setdefault("PYTHONUNBUFFERED", "1")
