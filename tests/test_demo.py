"""`lb demo`: runs, prints per-backend rows, stops by itself and leaves no process behind."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time

import psutil

from tests.conftest import ROOT, free_port

NAMES = ("fast", "slow", "degrading", "failing")
ROW = re.compile(r"^\s+(\S+)\s+(\d+\.\d)%\s+(\d+\.\d)\s+(\d+\.\d)\s+(\d+)\s*$")


def test_demo_runs_and_cleans_up():
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lb", "demo", "--duration", "3", "--rate", "50", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, acc=acc: acc.extend(s), daemon=True)
               for s, acc in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()

    # Every process the demo starts (backends, lb, lb's workers), sampled while it runs.
    descendants: dict[int, str] = {}
    try:
        while proc.poll() is None and time.monotonic() - t0 < 15:
            try:
                for c in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        descendants.setdefault(c.pid, " ".join(c.cmdline()))
                    except psutil.Error:
                        pass
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        assert proc.poll() is not None, "lb demo still running 15 s after it started"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        for r in readers:
            r.join(5)
    stdout = b"".join(out).decode(errors="replace")
    stderr = b"".join(err).decode(errors="replace")

    assert proc.returncode == 0, (proc.returncode, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stderr, stderr

    # The processes it started: the simulated backends, `lb run`, and lb's workers.
    cmds = list(descendants.values())
    assert any("lb.demo_backends" in c for c in cmds), cmds
    assert any(" lb run " in f" {c} " for c in cmds), cmds
    assert any("-m workers" in c for c in cmds), cmds

    # Per-backend rows of the table, and every simulated backend named.
    for name in NAMES:
        assert name in stdout, f"{name!r} not in the demo output:\n{stdout}"
    rows = [m.group(1) for m in map(ROW.match, stdout.splitlines()) if m]
    assert rows, stdout
    assert set(rows) <= set(NAMES), set(rows)
    assert len(set(rows)) >= 2, rows
    total = re.search(r"lb demo: (\d+) requests, (\d+) errors", stdout)
    assert total, stdout
    assert int(total.group(1)) >= 100, total.group(0)

    # Nothing left behind.
    deadline = time.monotonic() + 3
    alive = []
    while True:
        alive = []
        for pid, cmd in descendants.items():
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE and " ".join(p.cmdline()) == cmd:
                    alive.append((pid, cmd))
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert alive == [], f"left behind: {alive}"
    stray = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] in descendants and "lb.demo_backends" in cmd:
            stray.append((p.info["pid"], cmd))
        elif f"--port {port}" in cmd or f"127.0.0.1:{port}" in cmd:
            stray.append((p.info["pid"], cmd))
    assert stray == [], stray
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        listening = True
    except OSError:
        listening = False
    assert not listening, f"something still listens on the demo port {port}"
