"""Real processes on 127.0.0.1: test backends (tests/backend.py) and lb itself.

`LBRun` is the one harness for `lb run` (its config, workers, directory,
environment, session, stderr log); `LBProc` makes the config for lb in front
of test backends.  The supervisor tests' `SwappableLB` (tests/supervision.py)
and the test modules that need their own start (isolation, stop, CLI, log
rotation, restart with the same state) are built on it.  The admin process
alone (tests/adminharness.py) and a worker alone (test_worker_tables.py) are
started by their own harnesses: they are not `lb run`."""

from __future__ import annotations

import http.client
import json
import os
import signal
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


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()
# Ports for listeners the tests start come from below the kernel's ephemeral
# range, so no client socket of the suite (thousands of them) can take one
# between the test choosing it and lb binding it; none is handed out twice in
# a run.  The start depends on the pid, so two suites on one host rarely meet.
_PORTS = iter(range(20000 + os.getpid() % 8000, 20000 + os.getpid() % 8000 + 4000))


def free_port() -> int:
    """A port nothing listens on or is bound to, never the same twice in a run."""
    for port in _PORTS:
        if _EPHEMERAL[0] <= port <= _EPHEMERAL[1]:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left for the tests")


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


class LBRun:
    """`lb run -c CONFIG -w N` as a test's child process: the one harness every
    test that runs lb whole uses.  Its stderr is read by a LogReader (`log`),
    unless `log=False` (stderr discarded).  `wait`: until every worker says
    ready.  `session`: in its own session, so `kill_group()` reaches the
    supervisor and all its children at once.  `port`/`admin_port`: what the
    config says, when the caller knows it."""

    def __init__(self, config: Path, *, workers: int = 1, cwd: Path = ROOT, env: dict | None = None,
                 args: tuple = (), argv: list[str] | None = None, session: bool = False,
                 wait: bool = True, log: bool = True, port: int = 0, admin_port: int = 0) -> None:
        self.config = config
        self.port = port
        self.admin_port = admin_port
        self.n_workers = workers
        cmd = [*(argv or [sys.executable, "-m", "lb"]), "run", "-c", str(config), "-w", str(workers), *args]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})},
                                     stderr=subprocess.PIPE if log else subprocess.DEVNULL,
                                     start_new_session=session)
        self.log = LogReader(self.proc.stderr) if log else None
        if self.log is not None:
            self.log.start()
            if wait:
                self.log.wait_for("worker_ready", workers)

    def worker_pids(self) -> list[int]:
        return [c.pid for c in child_processes(self.proc.pid, "workers")]

    def stop(self) -> int:
        """SIGTERM (a graceful stop), SIGKILL if it takes more than 20 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL to the whole session (`session=True`): supervisor and children."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def lb_config(port: int, admin_port: int, backends: list, *, strategy: str = "round_robin",
              extra: str = "", backend_lines: str | None = None) -> str:
    """A config for 127.0.0.1: these ports, the backends (objects with address
    and name) or `backend_lines` as they are, `extra` before [admin]."""
    lines = [f'listen = "127.0.0.1:{port}"', f'strategy = "{strategy}"', extra,
             "[admin]", f'listen = "127.0.0.1:{admin_port}"']
    if backend_lines is None:
        for b in backends:
            lines += ["[[backends]]", f'address = "{b.address}"', f'name = "{b.name}"']
    else:
        lines.append(backend_lines)
    return "\n".join(lines) + "\n"


class LBProc(LBRun):
    """lb in front of test backends, with a config made here (`lb_config`)."""

    def __init__(self, tmp_path: Path, backends: list[BackendProc], *, strategy: str = "round_robin",
                 workers: int = 1, extra: str = "", backend_lines: str | None = None,
                 env: dict | None = None) -> None:
        port, admin_port = free_port(), free_port()
        config = tmp_path / f"lb-{port}.toml"
        config.write_text(lb_config(port, admin_port, backends, strategy=strategy, extra=extra,
                                    backend_lines=backend_lines))
        super().__init__(config, workers=workers, env=env, port=port, admin_port=admin_port)


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
def scenario_backends():
    """start(scenario, duration) -> (ports, process): a quality scenario's
    simulated backends (bench/scenario_backend.py), one port each; stopped
    after the test (and required to exit cleanly)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import scenarios as scn

    procs: list[subprocess.Popen] = []

    def start(name: str, duration: float):
        sc = scn.get(name)
        ports = [free_port() for _ in sc.backends]
        p = subprocess.Popen(
            [sys.executable, "bench/scenario_backend.py", "--scenario", name,
             "--ports", ",".join(map(str, ports)), "--duration", str(duration)],
            cwd=ROOT, stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout.readline() == b"ready\n"
        return ports, p

    yield start
    for p in procs:
        p.send_signal(signal.SIGTERM)
        try:
            assert p.wait(5) == 0
        except subprocess.TimeoutExpired:
            p.kill()
            raise


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
def ca(tmp_path):
    """A certificate authority made for the test (trustme; tests/tlsutil.py)."""
    from tests.tlsutil import CertAuthority

    return CertAuthority(tmp_path)


@pytest.fixture
def made():
    """The processes a test starts (LBProc or BackendProc), stopped at its end."""
    procs = []
    yield procs
    for p in reversed(procs):
        if isinstance(p, LBProc):
            p.stop()
        else:
            p.kill()


@pytest.fixture
def backend(backend_factory):
    return backend_factory("b1")


@pytest.fixture
def lb(lb_factory, backend):
    return lb_factory([backend])


os.environ.setdefault("PYTHONUNBUFFERED", "1")
