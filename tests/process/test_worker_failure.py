"""Workers that die: replaced within a second under load; workers that cannot boot stop the supervisor."""

from __future__ import annotations

import os
import select
import signal
import socket
import time

import psutil
import pytest

from tests.conftest import ROOT, LBRun, free_port
from tests.rawhttp import RawConn
from tests.supervision import Client, live_workers, still_alive, wait_until

# -- several workers -----------------------------------------------------------------------


def test_two_workers_both_accept_connections(backend, lb_factory):
    lb = lb_factory([backend], workers=2)
    ready = lb.log.events("worker_ready")
    assert sorted(e["slot"] for e in ready) == [0, 1]
    pids = live_workers(lb.proc.pid)
    assert len(pids) == 2, pids
    assert sorted(e["pid"] for e in ready) == pids
    for pid in pids:
        assert psutil.Process(pid).ppid() == lb.proc.pid

    conns = []
    try:
        for _ in range(40):
            c = RawConn(lb.port, timeout=5)
            conns.append(c)
            resp = c.request("GET", "/")
            assert resp.status == 200 and resp.body == b"backend b1\n"
        # Every connection is still open (keep-alive): count them per worker.
        per_worker = {}
        for pid in pids:
            per_worker[pid] = sum(
                1 for k in psutil.Process(pid).net_connections(kind="tcp")
                if k.laddr and k.laddr.port == lb.port and k.status == psutil.CONN_ESTABLISHED
            )
    finally:
        for c in conns:
            c.close()
    assert sum(per_worker.values()) == 40, per_worker
    assert all(n > 0 for n in per_worker.values()), f"one worker accepted nothing: {per_worker}"



# -- a worker killed -----------------------------------------------------------------------


def burst(port: int, n: int) -> list[tuple[float, bytes]]:
    """Open n connections at once, send a GET on each, then collect (arrival time, bytes)."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n\r\n")
        socks.append(s)
    got: dict[socket.socket, bytes] = {s: b"" for s in socks}
    first: dict[socket.socket, float] = {}
    open_ = set(socks)
    deadline = time.monotonic() + 8
    try:
        while open_ and time.monotonic() < deadline:
            r, _, _ = select.select(list(open_), [], [], 0.2)
            for s in r:
                try:
                    chunk = s.recv(65536)
                except OSError:
                    chunk = b""
                if chunk:
                    first.setdefault(s, time.time())
                    got[s] += chunk
                else:
                    open_.discard(s)
    finally:
        for s in socks:
            s.close()
    return [(first.get(s, float("inf")), got[s]) for s in socks]


def test_sigkill_of_a_worker_under_load(backend, lb_factory):
    lb = lb_factory([backend], workers=2)
    pids = live_workers(lb.proc.pid)
    assert len(pids) == 2
    victim, survivor = pids
    keepalive = Client(lb.port, keepalive=True, pause=0.002)
    fresh = Client(lb.port, keepalive=False, pause=0.002)
    keepalive.start()
    fresh.start()
    try:
        assert wait_until(lambda: min(len(keepalive.results), len(fresh.results)) >= 20, 10), \
            "the clients made no requests"
        t_kill = time.time()
        os.kill(victim, signal.SIGKILL)
        answers = burst(lb.port, 20)
        died = lb.log.wait_for("worker_died", 1, timeout=3)[0]
        ready = lb.log.wait_for("worker_ready", 3, timeout=3)[2]
        # Both clients running on well after the replacement came up.
        assert wait_until(lambda: sum(r["t0"] > ready["ts"] + 0.1 for r in list(keepalive.results)) >= 20
                          and sum(r["opened"] > t_kill for r in list(fresh.results)) >= 20, 10), \
            "the clients made no requests after the replacement"
    finally:
        ka = keepalive.stop()
        nc = fresh.stop()

    assert died["pid"] == victim and died["code"] == -signal.SIGKILL, died
    assert ready["pid"] not in pids and ready["slot"] == died["slot"], ready
    assert ready["ts"] - t_kill < 1.5, f"replacement ready {ready['ts'] - t_kill:.2f} s after the kill"
    events = lb.log.events()
    assert events.index(died) < events.index(ready)
    assert live_workers(lb.proc.pid) == sorted([survivor, ready["pid"]])

    # Connections opened after the kill all get answers (those hashed to the dead
    # worker's socket wait in its queue for the replacement), and the surviving
    # worker answers meanwhile.
    assert all(data.startswith(b"HTTP/1.1 200") for _, data in answers), [d[:40] for _, d in answers]
    assert min(t for t, _ in answers) < ready["ts"], "nothing was served before the replacement was ready"

    for name, results in (("keep-alive", ka), ("new-connection", nc)):
        if name == "keep-alive":
            # Its connection may sit on the surviving worker and never reopen: look
            # at the requests made once the replacement was up.
            after = [r for r in results if r["t0"] > ready["ts"] + 0.1]
        else:
            after = [r for r in results if r["opened"] > t_kill]
        assert after, f"{name} client made no request after the kill"
        bad = Client.failures(after)
        assert bad == [], f"{name} client, connections opened after the kill: {bad[:5]}"
        # Only a connection that was on the killed worker may have lost its request.
        assert len(Client.failures(results)) <= 1, Client.failures(results)
        assert any(r["ok"] and r["t0"] > ready["ts"] for r in results)


def test_workers_failing_at_boot_make_the_supervisor_give_up(tmp_path, backend):
    # Put first on PYTHONPATH an `httptools` that cannot be imported (only workers import
    # it): every worker the supervisor starts dies at once, before it is ready.
    fake = tmp_path / "cwd"
    (fake / "httptools").mkdir(parents=True)
    (fake / "httptools" / "__init__.py").write_text('raise ImportError("simulated boot failure")\n')
    cfg = tmp_path / "boot.toml"
    port = free_port()
    cfg.write_text(f'listen = "127.0.0.1:{port}"\n[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
                   f'[[backends]]\naddress = "{backend.address}"\nname = "b1"\n')
    t0 = time.monotonic()
    run = LBRun(cfg, workers=2, cwd=fake, wait=False,
                env={"PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])})
    proc, log = run.proc, run.log
    seen: set[int] = set()
    try:
        while proc.poll() is None and time.monotonic() - t0 < 20:
            seen.update(live_workers(proc.pid))
            time.sleep(0.02)
        assert proc.poll() is not None, "supervisor still running 20 s after workers started failing"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
    log.join(5)
    elapsed = time.monotonic() - t0
    assert "simulated boot failure" in "\n".join(log.lines)  # the failure really was at import
    assert proc.returncode != 0
    assert elapsed < 15, elapsed
    assert log.events("worker_ready") == []
    gave_up = log.events("supervisor_giving_up")
    assert len(gave_up) == 1, log.lines[-20:]
    died = log.events("worker_died")
    assert 5 <= len(died) <= 8, f"{len(died)} worker deaths before giving up"
    exits = log.events("supervisor_exit")
    assert exits and exits[-1]["code"] == proc.returncode
    assert still_alive(seen, timeout=2) == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
