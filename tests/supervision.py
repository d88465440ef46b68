"""Helpers for the supervisor tests: config rewriting, worker discovery, load clients."""

from __future__ import annotations

import importlib.util
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil

from tests.conftest import ROOT, LBRun, free_port, wait_port
from tests.rawhttp import RawConn


def write_config(lb, backends, strategy: str = "round_robin", weights: dict | None = None) -> None:
    """Rewrite lb's config file in place (same listen and admin addresses), atomically."""
    lines = [
        f'listen = "127.0.0.1:{lb.port}"',
        f'strategy = "{strategy}"',
        "[admin]",
        f'listen = "127.0.0.1:{lb.admin_port}"',
    ]
    for b in backends:
        lines += ["[[backends]]", f'address = "{b.address}"', f'name = "{b.name}"']
        if weights and b.name in weights:
            lines.append(f"weight = {weights[b.name]}")
    tmp = lb.config.with_suffix(".new")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, lb.config)


def live_workers(pid: int) -> list[int]:
    """Pids of the running (non-zombie) worker processes under the process `pid`."""
    out = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for c in children:
        try:
            if c.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = c.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "workers" in cmd and "--fd" in cmd:
            out.append(c.pid)
    return sorted(out)


def still_alive(pids, timeout: float = 5.0) -> list[int]:
    """The pids among `pids` still running after up to `timeout` s (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def wait_until(pred, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def fetch(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str | None]:
    """One GET on a new connection: (status, X-Backend)."""
    with RawConn(port, timeout=timeout) as c:
        resp = c.request("GET", path)
        return resp.status, resp.header("x-backend")


def backends_seen(port: int, n: int = 12) -> set[str]:
    seen = set()
    for _ in range(n):
        status, name = fetch(port)
        assert status == 200
        seen.add(name)
    return seen


def dropped(sock: socket.socket) -> bool:
    """True if the peer has closed an idle keep-alive connection (checked before reusing it)."""
    r, _, _ = select.select([sock], [], [], 0)
    if not r:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Client(threading.Thread):
    """Sequential GETs until stopped: on one keep-alive connection, or each on a new one.

    Every attempt is recorded; a non-200 or any connection error counts as a failure.  The
    keep-alive client reconnects when the server said `Connection: close`, or when it finds
    the idle connection already closed before sending (as ordinary HTTP clients do).
    """

    MAX = 50_000

    def __init__(self, port: int, keepalive: bool, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.keepalive = keepalive
        self.pause = pause
        self.halt = threading.Event()
        self.results: list[dict] = []

    def run(self) -> None:
        conn = None
        opened = 0.0
        while not self.halt.is_set() and len(self.results) < self.MAX:
            rec = {"t0": time.time(), "ok": False, "status": None, "backend": None, "error": None}
            try:
                if conn is not None and dropped(conn.sock):
                    conn.close()
                    conn = None
                if conn is None:
                    conn = RawConn(self.port, timeout=5)
                    opened = time.time()
                rec["opened"] = opened
                resp = conn.request("GET", "/")
                rec["status"] = resp.status
                rec["backend"] = resp.header("x-backend")
                rec["ok"] = resp.status == 200
                if not self.keepalive or "close" in resp.connection_tokens():
                    conn.close()
                    conn = None
            except (OSError, EOFError, AssertionError, ValueError) as exc:
                rec.setdefault("opened", opened)
                rec["error"] = repr(exc)
                if conn is not None:
                    conn.close()
                conn = None
            rec["t1"] = time.time()
            self.results.append(rec)
            if self.pause:
                time.sleep(self.pause)
        if conn is not None:
            conn.close()

    def stop(self) -> list[dict]:
        self.halt.set()
        self.join(15)
        assert not self.is_alive(), "client thread did not stop"
        return self.results

    @staticmethod
    def failures(results: list[dict]) -> list[dict]:
        return [r for r in results if not r["ok"]]


def lb_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lb", *args]



REAL_HTTPTOOLS = Path(importlib.util.find_spec("httptools").origin).parent


class SwappableLB(LBRun):
    """`lb run` whose workers import `httptools` (only workers do) through a symlink first on
    PYTHONPATH: pointing at the real package, or at one that fails on import (as after a
    broken deploy).  lb's own packages cannot be swapped this way: every child takes them
    from where the supervisor's came from (lb/core/boot.py)."""

    def __init__(self, tmp_path: Path, backends, workers: int = 2) -> None:
        self.cwd = tmp_path / "cwd"
        self.cwd.mkdir()
        self.broken = tmp_path / "broken" / "httptools"
        self.broken.mkdir(parents=True)
        (self.broken / "__init__.py").write_text('raise ImportError("simulated broken deploy")\n')
        self.link = self.cwd / "httptools"
        os.symlink(REAL_HTTPTOOLS, self.link)
        self.port = free_port()
        self.admin_port = free_port()
        self.config = tmp_path / "swap.toml"
        write_config(self, backends)
        super().__init__(self.config, workers=workers, cwd=self.cwd, session=True,
                         env={"PYTHONPATH": os.pathsep.join([str(self.cwd), str(ROOT)])},
                         port=self.port, admin_port=self.admin_port)
        wait_port(self.port)

    def point_to(self, target: Path) -> None:
        tmp = self.cwd / "workers.tmp"
        os.symlink(target, tmp)
        os.replace(tmp, self.link)

    def break_workers(self) -> None:
        self.point_to(self.broken)

    def fix_workers(self) -> None:
        self.point_to(REAL_HTTPTOOLS)

    def stop(self) -> None:
        # a graceful stop first: the supervisor stops its children and removes
        # its runtime directory (a SIGKILL leaves that in /tmp); then whatever
        # is left of the session
        super().stop()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

