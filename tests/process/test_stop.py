"""Starting on a taken address, graceful and forced stops, and a supervisor that disappears."""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import time

import pytest

from tests.conftest import ROOT, LBRun, free_port
from tests.rawhttp import get
from tests.supervision import lb_cmd, live_workers, still_alive

# -- address already in use ----------------------------------------------------------------


def test_run_on_a_port_taken_by_another_socket_fails_with_one_line(tmp_path, backend):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(8)
    port = blocker.getsockname()[1]
    cfg = tmp_path / "taken.toml"
    cfg.write_text(f'listen = "127.0.0.1:{port}"\n[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
                   f'[[backends]]\naddress = "{backend.address}"\n')
    try:
        proc = subprocess.run(lb_cmd("run", "-c", str(cfg), "-w", "2"), cwd=ROOT,
                              capture_output=True, text=True, timeout=15)
    finally:
        blocker.close()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{port}" in lines[0] and lines[0].startswith("lb: "), lines[0]


def test_run_on_a_port_taken_by_a_running_lb_fails_with_one_line(tmp_path, backend, lb_factory):
    first = lb_factory([backend], workers=1)
    cfg = tmp_path / "second.toml"
    cfg.write_text(f'listen = "127.0.0.1:{first.port}"\n[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
                   f'[[backends]]\naddress = "{backend.address}"\n')
    run = LBRun(cfg, session=True, wait=False)
    second, log = run.proc, run.log
    try:
        second.wait(6)
    except subprocess.TimeoutExpired:
        pass
    finally:
        running = second.poll() is None
        run.kill_group()
    log.join(5)
    assert not running, ("a second `lb run` on the port of a running lb started and served "
                         f"instead of failing: {[e['event'] for e in log.events()]}")
    assert second.returncode != 0
    lines = [x for x in log.lines if x.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines



# -- stopping ------------------------------------------------------------------------------


def test_sigterm_finishes_in_flight_request_and_refuses_new_connections(backend, lb_factory):
    lb = lb_factory([backend], workers=2)
    pids = live_workers(lb.proc.pid)
    assert len(pids) == 2
    slow = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    late = None
    try:
        slow.sendall(b"GET /slow/1500 HTTP/1.1\r\nHost: lb.test\r\n\r\n")
        backend.wait_request("/slow/1500")  # in flight
        t_term = time.monotonic()
        lb.proc.send_signal(signal.SIGTERM)
        lb.log.wait_for("worker_draining", 2, timeout=3)

        # A new connection after SIGTERM: refused, or closed without an answer.
        late_outcome = None
        try:
            late = socket.create_connection(("127.0.0.1", lb.port), timeout=2)
            late.sendall(b"GET / HTTP/1.1\r\nHost: lb.test\r\n\r\n")
            late.setblocking(False)
        except ConnectionRefusedError:
            late_outcome = ("refused", time.monotonic())
        except OSError as exc:  # reset while sending
            late_outcome = (f"closed ({exc!r})", time.monotonic())

        slow_data = b""
        slow_done = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (slow_done is None or late_outcome is None):
            watch = [s for s, pending in ((slow, slow_done is None), (late, late_outcome is None))
                     if pending and s is not None]
            r, _, _ = select.select(watch, [], [], 0.2)
            if slow in r:
                chunk = slow.recv(65536)
                slow_data += chunk
                if not chunk or slow_data.endswith(b"backend b1\n"):
                    slow_done = time.monotonic()
            if late is not None and late in r:
                try:
                    chunk = late.recv(65536)
                except OSError as exc:
                    chunk, reason = b"", f"closed ({exc!r})"
                else:
                    reason = "closed" if not chunk else f"answered {chunk[:30]!r}"
                late_outcome = (reason, time.monotonic())
        code = lb.proc.wait(10)
        t_exit = time.monotonic()
    finally:
        slow.close()
        if late is not None:
            late.close()

    assert slow_data.startswith(b"HTTP/1.1 200"), slow_data[:100]
    assert slow_done is not None and slow_done - t_term > 0.8
    assert late_outcome is not None, "new connection neither refused nor closed"
    assert not late_outcome[0].startswith("answered"), late_outcome
    assert late_outcome[1] < slow_done, (
        f"new connection made after SIGTERM was accepted and left waiting until "
        f"{late_outcome[1] - t_term:.2f} s after SIGTERM ({late_outcome[0]}), after the in-flight "
        f"request finished at {slow_done - t_term:.2f} s")
    assert code == 0
    assert t_exit - t_term < 4, "supervisor did not exit soon after the last request finished"
    assert still_alive(pids, timeout=3) == []
    assert lb.log.events("supervisor_exit")[-1]["code"] == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", lb.port), timeout=1).close()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_during_drain_stops_at_once(backend, lb_factory, second):
    lb = lb_factory([backend], workers=2)  # drain timeout: the default 30 s
    pids = live_workers(lb.proc.pid)
    hung = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    try:
        hung.sendall(b"GET /hang HTTP/1.1\r\nHost: lb.test\r\n\r\n")
        backend.wait_request("/hang")  # in flight
        lb.proc.send_signal(signal.SIGTERM)
        lb.log.wait_for("worker_draining", 2, timeout=3)
        time.sleep(0.5)
        assert lb.proc.poll() is None, "the first SIGTERM did not wait for the in-flight request"
        t_second = time.monotonic()
        lb.proc.send_signal(second)
        code = lb.proc.wait(10)
        elapsed = time.monotonic() - t_second
        try:
            leftover = hung.recv(65536)
        except OSError:
            leftover = b""
    finally:
        hung.close()
    assert elapsed < 3, f"supervisor took {elapsed:.2f} s after the second signal"
    assert code is not None and code >= 0
    assert leftover == b""  # the hung request was cut, not answered
    assert still_alive(pids, timeout=2) == []
    stops = lb.log.events("supervisor_stopping")
    assert [s["graceful"] for s in stops] == [True, False], stops


def test_workers_exit_when_the_supervisor_is_killed(backend, lb_factory, tmp_path):
    # (a killed supervisor cannot remove its runtime directory: this one is the test's)
    lb = lb_factory([backend], workers=2, extra=f'runtime_dir = "{tmp_path / "run"}"')
    pids = live_workers(lb.proc.pid)
    assert len(pids) == 2
    assert get(lb.port)[0] == 200
    lb.proc.kill()
    lb.proc.wait(5)
    assert still_alive(pids, timeout=5) == [], "workers outlived their supervisor"
    assert len(lb.log.wait_for("worker_orphaned", 2, timeout=2)) == 2


def test_no_child_outlives_a_supervisor_killed_while_they_boot(backend, tmp_path):
    # Killed at once: the inference process is still importing onnxruntime, the
    # workers and admin are starting.  Each must notice its supervisor is gone.
    import psutil

    cfg = tmp_path / "lb.toml"
    cfg.write_text(f'listen = "127.0.0.1:{free_port()}"\nstrategy = "ml"\n'
                   f'runtime_dir = "{tmp_path / "run"}"\n'  # (the killed supervisor leaves it)
                   f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
                   f'[[backends]]\naddress = "{backend.address}"\n')
    proc = LBRun(cfg, workers=2, wait=False, log=False).proc
    children: set[int] = set()
    deadline = time.monotonic() + 10
    while len(children) < 4 and time.monotonic() < deadline:  # 2 workers, inference, admin
        try:
            children |= {c.pid for c in psutil.Process(proc.pid).children()}
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    assert len(children) == 4
    proc.kill()
    proc.wait(5)
    assert still_alive(sorted(children), timeout=8) == [], "children outlived their supervisor"
