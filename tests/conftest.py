"""Real processes on 127.0.0.1: test backends (tests/backend.py) and lb itself."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


# -- tiers -----------------------------------------------------------------------------------------
# tests/unit: in this process only (`pytest -m unit` or `pytest tests/unit`, a
# few seconds); tests/process: lb's own processes and Python backends;
# tests/external: a real third-party engine as well (Prometheus, Chromium,
# dnsmasq, etcd, openssl/curl/testssl.sh, Locust).  The directory gives the
# marker (`unit`, `process`, `external`: external tests are `process` too).
# A unit test that tries to start a process fails, so the tier cannot quietly
# grow slow.
TIERS = ("unit", "process", "external")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: a test module belongs in tests/unit, tests/process "
                                    "or tests/external")
        item.add_marker(getattr(pytest.mark, tier))
        if tier == "external":
            item.add_marker(pytest.mark.process)


@pytest.fixture(autouse=True)
def _unit_starts_no_process(request, monkeypatch):
    if request.node.get_closest_marker("unit") is not None:
        def refuse(*a, **k):
            raise AssertionError("a unit-tier test started a process: move it to tests/process")
        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield


def child_processes(pid: int, needle: str, recursive: bool = False) -> list[psutil.Process]:
    """Live children of `pid` whose command line contains `needle`. A child that exits while it is
    being looked at (an old worker retiring after a reload) is skipped, not an error."""
    try:
        children = psutil.Process(pid).children(recursive=recursive)
    except psutil.NoSuchProcess:
        return []
    out = []
    for c in children:
        try:
            if c.status() != psutil.STATUS_ZOMBIE and needle in " ".join(c.cmdline()):
                out.append(c)
        except psutil.Error:
            pass
    return out


def inference_pids(lb_pid: int) -> list[int]:
    """The live inference process(es) of an lb supervisor."""
    return [c.pid for c in child_processes(lb_pid, " inference")]


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
    def __init__(self, name: str, keepalive_timeout: float | None = None, port: int | None = None,
                 tls: dict | None = None, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host  # any of 127/8: several backends on one port, for DNS records
        self.port = port or free_port()
        self.tls = tls  # {"cert", "key", "client_ca"}: an HTTPS backend
        args = [sys.executable, "-m", "tests.backend", "--port", str(self.port), "--name", name,
                "--host", host]
        if keepalive_timeout is not None:
            args += ["--keepalive-timeout", str(keepalive_timeout)]
        if tls:
            args += ["--tls-cert", tls["cert"], "--tls-key", tls["key"],
                     "--tls-client-ca", tls.get("client_ca", "")]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        assert line.strip() == b"ready", line

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _get(self, method: str, path: str) -> bytes:
        if self.tls:
            import ssl

            c = http.client.HTTPSConnection(self.host, self.port, timeout=5,
                                            context=ssl._create_unverified_context())
        else:
            c = http.client.HTTPConnection(self.host, self.port, timeout=5)
        c.request(method, path)
        body = c.getresponse().read()
        c.close()
        return body

    def requests(self) -> list[dict]:
        return json.loads(self._get("GET", "/__requests"))

    def wait_request(self, target: str, timeout: float = 10.0) -> dict:
        """The record of a request for `target`, once this backend has it (it records a
        request as soon as its head is parsed, before any /slow or /hang wait)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.requests() if r["target"] == target]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} never received {target}")
            time.sleep(0.02)

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
                 workers: int = 1, extra: str = "", backend_lines: str | None = None,
                 env: dict | None = None) -> None:
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
            cwd=ROOT, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
        )
        self.log = LogReader(self.proc.stderr)
        self.log.start()
        self.log.wait_for("worker_ready", workers)

    def worker_pids(self) -> list[int]:
        return [c.pid for c in child_processes(self.proc.pid, "workers")]

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
def servers():
    """Backends whose status and delay a test switches at run time
    (tests/flaky_backends.py), made by name; all closed after the test."""
    from tests.flaky_backends import SwitchableServer

    made = []

    def make(name, **kw):
        s = SwitchableServer(name, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


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


# -- byte-exact HTTP/1.1 client (strict response framing) ---------------------


class RawResponse:
    def __init__(self, version: str, status: int, headers: list[tuple[str, str]], head: bytes) -> None:
        self.version = version
        self.status = status
        self.headers = headers  # (lower-case name, value), in order
        self.head = head
        self.body = b""

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def header(self, name: str) -> str | None:
        vs = self.values(name)
        assert len(vs) <= 1, f"{name} repeated: {vs}"
        return vs[0] if vs else None

    def connection_tokens(self) -> set[str]:
        return {t.strip().lower() for v in self.values("connection") for t in v.split(",") if t.strip()}


class RawConn:
    """A client socket that reads responses exactly as lb sent them, checking framing strictly."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()

    @classmethod
    def from_socket(cls, sock: socket.socket) -> "RawConn":
        c = cls.__new__(cls)
        c.sock = sock
        c.buf = bytearray()
        return c

    def __enter__(self) -> "RawConn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(262144)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed with {len(self.buf)} of {n} bytes")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                return self.read_exact(i + 2)[:-2]
            if not self._fill():
                raise EOFError("connection closed inside a line")

    def read_head(self) -> RawResponse:
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                break
            if not self._fill():
                raise EOFError(f"connection closed before a response head: {bytes(self.buf)!r}")
        head = self.read_exact(i + 4)
        lines = head[:-4].split(b"\r\n")
        status_line = lines[0].decode("latin-1")
        assert status_line.startswith("HTTP/1.") and status_line[12:13] in ("", " "), status_line
        version, code = status_line[5:8], int(status_line[9:12])
        headers = []
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            headers.append((name.lower(), value.strip()))
        return RawResponse(version, code, headers, head)

    def read_chunked(self) -> bytes:
        """A chunked body, strictly: hex size, CRLF, data, CRLF ... last chunk, trailers, CRLF."""
        parts = []
        while True:
            size_line = self._line()
            size_hex = size_line.split(b";", 1)[0].strip()
            assert size_hex and all(c in b"0123456789abcdefABCDEF" for c in size_hex), size_line
            size = int(size_hex, 16)
            if size == 0:
                while self._line():  # trailer fields, then the empty line
                    pass
                return b"".join(parts)
            parts.append(self.read_exact(size))
            assert self.read_exact(2) == b"\r\n", "chunk data not followed by CRLF"

    def read_until_close(self) -> bytes:
        while self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def read_body(self, resp: RawResponse, method: str = "GET") -> bytes:
        if method == "HEAD" or resp.status < 200 or resp.status in (204, 304):
            return b""
        te = resp.values("transfer-encoding")
        if te:
            assert [t.strip().lower() for t in te] == ["chunked"], te
            return self.read_chunked()
        cl = resp.values("content-length")
        if cl:
            assert len(cl) == 1, cl
            return self.read_exact(int(cl[0]))
        return self.read_until_close()

    def read_response(self, method: str = "GET") -> RawResponse:
        resp = self.read_head()
        resp.body = self.read_body(resp, method)
        return resp

    def request(self, method: str, target: str, headers: dict | None = None, body: bytes = b"",
                version: str = "1.1") -> RawResponse:
        self.send(build_request(method, target, headers, body, version))
        return self.read_response(method)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True if the peer closes (EOF or reset) within `timeout` with no further bytes."""
        if self.buf:
            return False
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(old)


def build_request(method: str, target: str, headers: dict | None = None, body: bytes = b"",
                  version: str = "1.1") -> bytes:
    hs = {"Host": "lb.test"} if version == "1.1" else {}
    hs.update(headers or {})
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in hs):
        hs["Content-Length"] = str(len(body))
    lines = [f"{method} {target} HTTP/{version}"] + [f"{k}: {v}" for k, v in hs.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk_body(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


def read_head(conn: socket.socket) -> bytes | None:
    """Read from `conn` until the end of a request head (what follows it in the
    same reads included); None if the peer closed first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    return buf


class ThreadedServer:
    """A raw TCP server on 127.0.0.1 for backends that misbehave on purpose:
    subclasses implement `handle(conn)`, run on a thread per connection."""

    def __init__(self, backlog: int = 64) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        self.stopping = True
        self.sock.close()
        self.thread.join(2)
