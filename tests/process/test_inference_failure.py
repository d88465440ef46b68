"""kill -9 of the inference process under load: the supervisor replaces it
within a second, the workers route on (p2c_ewma while its tables are stale)
and take the new process's tables as soon as it publishes them."""

from __future__ import annotations

import os
import signal
import time

from tests.conftest import inference_pids
from tests.load import Load, stop_all


def worker_modes(lb, slot: int) -> list[tuple[str, str]]:
    return [(e["mode"], e["reason"]) for e in lb.log.events("policy_mode") if e.get("slot") == slot]


def test_killed_inference_process_is_replaced_and_traffic_continues(backend_factory, lb_factory):
    a, b = backend_factory("a"), backend_factory("b")
    lb = lb_factory([a, b], strategy="ml", workers=2)
    lb.log.wait_for("inference_ready", timeout=20)
    load = Load(lb.port)
    load.start()
    try:
        time.sleep(1.0)
        [old] = inference_pids(lb.proc.pid)
        n_before = {slot: len(worker_modes(lb, slot)) for slot in (0, 1)}
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
        # Workers route by the new process's tables: whatever they logged since the
        # kill is "stale" (when the replacement took longer than two table
        # intervals to publish, which a fast one need not) or a mode the new
        # process published, and they end in the new process's current mode:
        # learned, or, on a host busy enough to blur latencies (the full suite
        # on two cores), the fallback it chose itself.  Never stuck on "stale":
        # that would be a worker left with the dead process's tables.  (Only the
        # workers' own events: the inference and admin processes log
        # policy_mode too.)
        def since_kill(slot: int) -> list[tuple[str, str]]:
            return worker_modes(lb, slot)[n_before[slot]:] or worker_modes(lb, slot)[-1:]

        def published() -> list[tuple[str, str]]:  # the new process's own mode changes
            return [(e["mode"], e["reason"]) for e in lb.log.events("policy_mode") if e.get("pid") == new[0]]

        def settled() -> bool:
            now = published()[-1:] or [("learned", "")]
            return all(since_kill(s)[-1:] == now for s in (0, 1))

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (settled() and since_kill(0)[-1] == ("learned", "")):
            time.sleep(0.05)
        time.sleep(0.5)  # longer than twice the table interval: a worker left with the dead
        for slot in (0, 1):  # process's tables would have gone stale by now
            modes = since_kill(slot)
            # A replacement that ticks before the first stats report reaches it
            # publishes warming_up (then low_confidence until its error estimate
            # settles): the fresh process's own states.
            fresh = {("fallback", "warming_up"), ("fallback", "low_confidence")}
            assert set(modes) <= {("fallback", "stale"), ("learned", "")} | fresh, modes
            assert modes[-1] != ("fallback", "stale"), modes
            assert modes[-1] == (published()[-1:] or [("learned", "")])[0], (modes, published())
    finally:
        stop_all([load])
    assert load.errors() == [], load.errors()[:5]
    assert len(load.results) > 100
