"""`lb demo`: runs, prints per-backend rows, stops by itself and leaves no process behind."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time

import psutil

from lb.core.config import STRATEGIES, Learning
from tests.conftest import ROOT, free_port
from tests.rawhttp import get
from workers import fastpath

NAMES = ("fast", "slow", "degrading", "failing")
ROW = re.compile(r"^\s+(\S+)\s+(\d+\.\d)%\s+(\d+\.\d)\s+(\d+\.\d)\s+(\d+)(\s+(\d+\.\d\d|-))?\s*$")


def test_demo_runs_and_cleans_up():
    port = free_port()
    admin_port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lb", "demo", "--duration", "5", "--rate", "50", "--port", str(port),
         "--admin-port", str(admin_port)],
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
    dashboard = None
    try:
        while proc.poll() is None and time.monotonic() - t0 < 20:
            if dashboard is None and f"dashboard http://127.0.0.1:{admin_port}/" in b"".join(out).decode():
                dashboard = get(admin_port, "/")
            try:
                for c in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        descendants.setdefault(c.pid, " ".join(c.cmdline()))
                    except psutil.Error:
                        pass
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        assert proc.poll() is not None, "lb demo still running 20 s after it started"
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
    # every one through lb/core/boot.py (lb's own code, whatever the current directory)
    assert any("lb/core/boot.py workers " in c for c in cmds), cmds
    assert any("lb/core/boot.py inference " in c for c in cmds), cmds
    assert any("lb/core/boot.py lb.admin " in c for c in cmds), cmds
    assert any("lb/core/boot.py lb.demo_backends " in c for c in cmds), cmds

    # The dashboard was served while the demo ran, and the view shows the policy.
    assert dashboard is not None and dashboard[0] == 200, stdout[:2000]
    assert b"<html" in dashboard[2].lower()
    assert "policy: ml" in stdout, stdout[-2000:]
    # The header says whether the workers use the C fast path (their worker_ready lines).
    if fastpath.AVAILABLE:
        assert "lb demo: C fast path: on in all 2 workers" in stdout, stdout[:2000]
    else:
        assert "lb demo: C fast path: OFF in all 2 workers" in stdout, stdout[:2000]

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


def test_demo_compare_prints_one_row_per_strategy():
    # With the fast path switched off, to see the header say so; and with the
    # port it is given taken, to see a comparison go on with a free one.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = subprocess.run(
            [sys.executable, "-m", "lb", "demo", "--compare", "--duration", "2.5", "--rate", "40",
             "--port", str(taken.getsockname()[1]), "--admin-port", str(free_port())],
            cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "LB_NO_FASTPATH": "1"},
        )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert "lb demo --compare: a port was in use; going on with" in r.stderr, r.stderr[-2000:]
    table = r.stdout.split("p99.9 ms")[1].strip().splitlines()[1:]  # after the header
    rows, note = table[:len(STRATEGIES)], " ".join(line.strip() for line in table[len(STRATEGIES):])
    strategies = [line.split()[0] for line in rows]
    assert strategies == list(STRATEGIES)
    for line in rows:
        name, n, p50, p99, p999, err = line.split()
        assert int(n) >= 10 and 0 < float(p50) <= float(p99) <= float(p999), line
        assert err.endswith("%")
    assert "lb demo --compare: C fast path: OFF in all 2 workers, switched off by LB_NO_FASTPATH" in r.stdout
    # Under the table: where the errors come from (the fail-fast backend), ml's exploration
    # share among the causes, and the count matching the runs'.
    errors = sum(int(m.group(1)) for m in re.finditer(r"done: \d+ requests, (\d+) errors", r.stdout))
    counted = re.match(r"(All (\d+) errors are|(\d+) of (\d+) errors are|No errors; any would be) "
                       r"503s from 'failing'", note)
    assert counted, r.stdout[-1500:]
    assert errors == int(counted.group(2) or counted.group(4) or 0), (errors, note)
    assert f"ml also probes it with its exploration share: {Learning().exploration:.1%} of its picks" in note
    assert "(learning.exploration)" in note
