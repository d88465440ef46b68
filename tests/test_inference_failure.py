"""kill -9 of the inference process under load: the supervisor replaces it
within a second, the workers route on (p2c_ewma while its tables are stale)
and take the new process's tables as soon as it publishes them."""

from __future__ import annotations

import os
import signal
import time

import psutil

from tests.test_backend_failover import Load


def inference_pids(lb_pid: int) -> list[int]:
    out = []
    for c in psutil.Process(lb_pid).children():
        try:
            if c.status() != psutil.STATUS_ZOMBIE and "inference" in c.cmdline():
                out.append(c.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_killed_inference_process_is_replaced_and_traffic_continues(backend_factory, lb_factory):
    a, b = backend_factory("a"), backend_factory("b")
    lb = lb_factory([a, b], strategy="ml", workers=2)
    lb.log.wait_for("inference_ready", timeout=20)
    load = Load(lb.port)
    load.start()
    try:
        time.sleep(1.0)
        [old] = inference_pids(lb.proc.pid)
        os.kill(old, signal.SIGKILL)
        t_kill = time.monotonic()
        new = []
        while not new and time.monotonic() - t_kill < 3:
            new = [p for p in inference_pids(lb.proc.pid) if p != old]
            time.sleep(0.02)
        replaced_after = time.monotonic() - t_kill
        assert new, "no new inference process"
        assert replaced_after < 1.0, replaced_after
        died = lb.log.wait_for("child_died")[0]
        assert died["kind"] == "inference" and died["pid"] == old
        lb.log.wait_for("inference_ready", count=2, timeout=20)
        # Workers saw the tables go stale, then learned again from the new epoch.
        modes = lambda: [(e["mode"], e["reason"]) for e in lb.log.events("policy_mode")]  # noqa: E731
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and modes()[-1:] != [("learned", "")]:
            time.sleep(0.1)
        assert ("fallback", "stale") in modes()
        assert modes()[-1] == ("learned", "")
        time.sleep(0.5)
    finally:
        load.stop.set()
        load.join(10)
    assert load.errors() == [], load.errors()[:5]
    assert len(load.results) > 100
