"""A child whose event loop stops (SIGSTOP stands in for a loop stuck in a
long computation) misses its heartbeats: the supervisor kills it after
`timeouts.heartbeat` and replaces it; traffic continues on the other worker."""

from __future__ import annotations

import os
import signal
import time

from tests.conftest import get
from tests.supervision import live_workers
from tests.test_inference_failure import inference_pids


def test_stuck_worker_and_inference_are_killed_and_replaced(lb_factory, backend):
    lb = lb_factory([backend], workers=2, strategy="ml", extra="[timeouts]\nheartbeat = 1.5\n")
    lb.log.wait_for("inference_ready", timeout=20)
    time.sleep(1.2)  # a heartbeat from everyone has been heard
    workers = live_workers(lb.proc.pid)
    assert len(workers) == 2
    stuck_worker = workers[0]
    [stuck_inference] = inference_pids(lb.proc.pid)
    t0 = time.monotonic()
    os.kill(stuck_worker, signal.SIGSTOP)
    os.kill(stuck_inference, signal.SIGSTOP)
    events = lb.log.wait_for("child_stuck", count=2, timeout=10)
    elapsed = time.monotonic() - t0
    assert {e["pid"] for e in events} == {stuck_worker, stuck_inference}
    assert {e["kind"] for e in events} == {"worker", "inference"}
    assert 0.5 <= elapsed < 4.0, elapsed  # silent since the last heartbeat, up to 1 s before the stop
    # Both replaced; the replacements report ready.
    lb.log.wait_for("worker_ready", count=3, timeout=10)
    lb.log.wait_for("inference_ready", count=2, timeout=20)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = live_workers(lb.proc.pid)
        if len(now) == 2 and stuck_worker not in now:
            break
        time.sleep(0.05)
    assert stuck_worker not in now and len(now) == 2
    for _ in range(20):
        assert get(lb.port, "/")[0] == 200
