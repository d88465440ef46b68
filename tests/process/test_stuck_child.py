"""A child whose event loop stops (SIGSTOP stands in for a loop stuck in a
long computation) misses its heartbeats: the supervisor kills it after
`timeouts.heartbeat` and replaces it; traffic continues on the other worker."""

from __future__ import annotations

import os
import signal
import time

from tests.conftest import inference_pids
from tests.rawhttp import get
from tests.supervision import live_workers


def test_stuck_worker_and_inference_are_killed_and_replaced(lb_factory, backend):
    lb = lb_factory([backend], workers=2, strategy="ml", extra="[timeouts]\nheartbeat = 1.5\n")
    # Both kinds have said R (before logging they are ready): the supervisor counts
    # their silence from then on, whether or not it has read a heartbeat yet.
    lb.log.wait_for("inference_ready", timeout=20)
    workers = live_workers(lb.proc.pid)
    assert len(workers) == 2
    stuck_worker = workers[0]
    [stuck_inference] = inference_pids(lb.proc.pid)
    os.kill(stuck_worker, signal.SIGSTOP)
    os.kill(stuck_inference, signal.SIGSTOP)
    events = lb.log.wait_for("child_stuck", count=2, timeout=10)
    assert {e["pid"] for e in events} == {stuck_worker, stuck_inference}
    assert {e["kind"] for e in events} == {"worker", "inference"}
    # Killed for a silence longer than timeouts.heartbeat, as the supervisor measured it.
    assert all(e["silent"] >= 1.5 and e["ready"] for e in events), events
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
