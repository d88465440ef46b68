"""`lb check` and `lb run`: config errors, a taken port, and clean stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, LBRun, LogReader, child_processes, free_port, wait_port
from tests.rawhttp import get

GOOD = """\
listen = "127.0.0.1:{port}"
strategy = "round_robin"

[admin]
listen = "127.0.0.1:{admin}"

[timeouts]
client_header = 5
drain = 2.0

[limits]
max_body_size = "10MiB"

[[backends]]
address = "127.0.0.1:9101"
name = "one"

[[backends]]
address = "localhost:9102"
name = "two"
weight = 3
"""

BACKEND = '[[backends]]\naddress = "127.0.0.1:9101"\nname = "one"\n'


def lb_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lb", *args]


def run_lb(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(lb_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def good_config(tmp_path: Path) -> Path:
    p = tmp_path / "good.toml"
    p.write_text(GOOD.format(port=free_port(), admin=free_port()))
    return p


def stderr_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# (id, file text or None for a missing file, the field the message must name)
BAD = [
    ("unknown_top_field", 'colour = "red"\n' + BACKEND, "colour"),
    ("unknown_section_field", "[timeouts]\nbogus = 1\n" + BACKEND, "bogus"),
    ("unknown_backend_field", '[[backends]]\naddress = "127.0.0.1:9101"\nport = 80\n', "port"),
    ("wrong_type", 'workers = "two"\n' + BACKEND, "workers"),
    ("nan_timeout", "[timeouts]\nclient_header = nan\n" + BACKEND, "timeouts.client_header"),
    ("inf_decay", "[balancer]\newma_decay = inf\n" + BACKEND, "balancer.ewma_decay"),
    ("wrong_type_in_section", '[timeouts]\nkeepalive = "long"\n' + BACKEND, "keepalive"),
    ("bad_backend_address", '[[backends]]\naddress = "no-port-here"\n', "address"),
    ("bad_listen_address", 'listen = "not an address"\n' + BACKEND, "listen"),
    ("bad_port", '[[backends]]\naddress = "127.0.0.1:70000"\n', "address"),
    ("port_zero", 'listen = "127.0.0.1:0"\n' + BACKEND, "listen"),
    ("unknown_strategy", 'strategy = "fastest"\n' + BACKEND, "strategy"),
    ("duplicate_backend_names",
     BACKEND + '[[backends]]\naddress = "127.0.0.1:9102"\nname = "one"\n', "one"),
    ("no_backends_key", 'listen = "127.0.0.1:8080"\n', "backends"),
    ("empty_backends", "backends = []\n", "backends"),
    ("invalid_toml", "listen = \n" + BACKEND, None),
    ("negative_timeout", "[timeouts]\nclient_header = -1\n" + BACKEND, "client_header"),
    ("zero_timeout", "[timeouts]\nupstream_connect = 0\n" + BACKEND, "upstream_connect"),
    ("bad_size_string", '[limits]\nmax_body_size = "lots"\n' + BACKEND, "max_body_size"),
    ("bad_size_unit", '[limits]\nmax_header_size = "16 parsecs"\n' + BACKEND, "max_header_size"),
    ("negative_weight", '[[backends]]\naddress = "127.0.0.1:9101"\nweight = -1\n', "weight"),
    ("address_and_srv", '[[backends]]\naddress = "127.0.0.1:9101"\nsrv = "_http._tcp.x.test"\n', "address"),
    ("bad_srv_name", '[[backends]]\nsrv = "not a name"\n', "srv"),
    ("srv_without_admin", '[admin]\nenabled = false\n[[backends]]\nsrv = "_http._tcp.x.test"\n', "srv"),
    ("bad_resolver", '[discovery]\nresolvers = ["dns.example"]\n' + BACKEND, "discovery.resolvers"),
    ("zero_interval", "[discovery]\ninterval = 0\n" + BACKEND, "discovery.interval"),
    ("https_etcd", '[fleet]\netcd = ["https://127.0.0.1:2379"]\n', "fleet.etcd"),
    ("bad_prefix", '[fleet]\netcd = ["http://127.0.0.1:2379"]\nprefix = "lb/"\n', "fleet.prefix"),
    ("missing_file", None, None),
]


def write_bad(tmp_path: Path, case_id: str, text: str | None) -> Path:
    p = tmp_path / f"{case_id}.toml"
    if text is not None:
        p.write_text(text)
    return p


def assert_one_line_error(proc: subprocess.CompletedProcess, path: Path, field: str | None) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = stderr_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert str(path) in line, line
    if field is not None:
        rest = line.replace(str(path), "")  # the file name itself must not count
        assert field in rest, f"field {field!r} not named in: {line}"


def test_check_good_file(tmp_path):
    p = good_config(tmp_path)
    proc = run_lb("check", "-c", str(p))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(p) in proc.stdout


def test_check_minimal_file(tmp_path):
    p = tmp_path / "min.toml"
    p.write_text(BACKEND)
    proc = run_lb("check", "-c", str(p))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case_id,text,field", BAD, ids=[c[0] for c in BAD])
def test_check_bad_file(tmp_path, case_id, text, field):
    p = write_bad(tmp_path, case_id, text)
    proc = run_lb("check", "-c", str(p))
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert_one_line_error(proc, p, field)


RUN_CASES = [c for c in BAD if c[0] in (
    "unknown_section_field", "wrong_type", "bad_backend_address", "unknown_strategy",
    "duplicate_backend_names", "invalid_toml", "negative_timeout", "bad_size_string", "missing_file",
)]


@pytest.mark.parametrize("case_id,text,field", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_bad_file(tmp_path, case_id, text, field):
    p = write_bad(tmp_path, case_id, text)
    proc = run_lb("run", "-c", str(p))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert_one_line_error(proc, p, field)


def test_run_bad_worker_count(tmp_path):
    p = good_config(tmp_path)
    proc = run_lb("run", "-c", str(p), "-w", "0")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(stderr_lines(proc.stderr)) == 1, proc.stderr


def test_run_on_taken_port_fails_with_one_line(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(8)
    port = blocker.getsockname()[1]
    try:
        p = tmp_path / "taken.toml"
        p.write_text(f'listen = "127.0.0.1:{port}"\n[admin]\nlisten = "127.0.0.1:{free_port()}"\n' + BACKEND)
        t0 = time.monotonic()
        proc = run_lb("run", "-c", str(p), timeout=20)
        assert time.monotonic() - t0 < 15
    finally:
        blocker.close()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = stderr_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert str(port) in lines[0], lines[0]


# -- stopping ---------------------------------------------------------------------------------


class Running(LBRun):
    """`lb run` in its own session (so a whole-group signal can be sent)."""

    def __init__(self, tmp_path: Path, backend_address: str, workers: int = 2) -> None:
        port = free_port()
        config = tmp_path / f"run-{port}.toml"
        config.write_text(
            f'listen = "127.0.0.1:{port}"\nstrategy = "round_robin"\n'
            "[timeouts]\ndrain = 3.0\n"
            f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'[[backends]]\naddress = "{backend_address}"\nname = "b1"\n'
        )
        super().__init__(config, workers=workers, session=True, port=port)
        wait_port(self.port)

    def workers(self) -> list[psutil.Process]:
        return child_processes(self.proc.pid, "workers", recursive=True)


@pytest.fixture
def running(tmp_path, backend):
    made: list[Running] = []

    def make(**kw) -> Running:
        r = Running(tmp_path, backend.address, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.kill_group()


def gone(procs: list[psutil.Process], timeout: float = 5.0) -> list[int]:
    """Pids of `procs` still running after `timeout` s (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def no_tracebacks(log: LogReader) -> None:
    text = "\n".join(log.lines)
    assert "Traceback" not in text, text[-3000:]


def test_sigterm_stops_cleanly(running):
    lb = running(workers=2)
    assert get(lb.port, "/")[0] == 200
    workers = lb.workers()
    assert len(workers) == 2
    lb.proc.send_signal(signal.SIGTERM)
    assert lb.proc.wait(15) == 0
    assert gone(workers) == []
    no_tracebacks(lb.log)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", lb.port), timeout=1).close()


@pytest.mark.parametrize("to_group", [False, True], ids=["supervisor", "process-group"])
def test_sigint_stops_cleanly(running, to_group):
    # to_group: a terminal's Ctrl-C sends SIGINT to the supervisor and every worker.
    lb = running(workers=2)
    assert get(lb.port, "/")[0] == 200
    workers = lb.workers()
    if to_group:
        os.killpg(lb.proc.pid, signal.SIGINT)
    else:
        lb.proc.send_signal(signal.SIGINT)
    code = lb.proc.wait(15)
    assert code in (0, 130), code
    assert gone(workers) == []
    no_tracebacks(lb.log)


def test_sigterm_while_a_request_is_in_flight_lets_it_finish(running, backend):
    lb = running(workers=1)
    workers = lb.workers()
    s = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    try:
        s.sendall(b"GET /slow/800 HTTP/1.1\r\nHost: x\r\n\r\n")
        backend.wait_request("/slow/800")  # in flight
        lb.proc.send_signal(signal.SIGTERM)
        got = b""
        while b"backend b1\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert lb.proc.wait(15) == 0
    assert gone(workers) == []
    events = [e["event"] for e in lb.log.events()]
    assert "supervisor_exit" in events


def test_log_lines_are_json(running):
    lb = running(workers=1)
    lb.proc.send_signal(signal.SIGTERM)
    assert lb.proc.wait(15) == 0
    lb.log.join(5)
    for line in lb.log.lines:
        if line.strip():
            json.loads(line)  # every stderr line of a normal run is a JSON event
