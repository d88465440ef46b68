"""The admin process across SIGHUP reloads and worker deaths, as `lb run` runs it:
/api/health stays 200 through every reload (the old generation serves until
the new one is ready), and no counter in /metrics ever goes backwards, through
reloads and through a worker killed with SIGKILL and replaced."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.rawhttp import get
from tests.supervision import live_workers, wait_until, write_config

STATS = "[learning]\nstats_interval = 0.1\n"


def health(port: int) -> int | str:
    """The status of one GET /api/health on a new connection, or the error."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            c.request("GET", "/api/health")
            r = c.getresponse()
            r.read()
            return r.status
        finally:
            c.close()
    except (OSError, http.client.HTTPException) as exc:
        return repr(exc)


class HealthPoller(threading.Thread):
    """GET /api/health about 20 times a second until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.halt = threading.Event()
        self.results: list[tuple[float, int | str]] = []

    def run(self) -> None:
        while not self.halt.wait(0.05):
            self.results.append((time.time(), health(self.port)))

    def stop(self) -> list[tuple[float, int | str]]:
        self.halt.set()
        self.join(10)
        assert not self.is_alive()
        return self.results


class Load(threading.Thread):
    """Sequential GETs through lb until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.halt = threading.Event()
        self.done = 0

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                get(self.port, "/x", timeout=5)
                self.done += 1
            except (OSError, http.client.HTTPException):
                pass  # e.g. the worker SIGKILLed mid-answer (IncompleteRead): the load goes on

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


def counters(port: int) -> dict[tuple, float]:
    """Every sample of every counter and histogram family in /metrics."""
    status, _, body = get(port, "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        if fam.type not in ("counter", "histogram"):
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def went_back(before: dict, after: dict) -> list:
    return [(k, v, after.get(k)) for k, v in before.items() if k not in after or after[k] < v]


def test_health_stays_ready_through_reloads(lb_factory, backend_factory):
    b1, b2 = backend_factory("b1"), backend_factory("b2")
    lb = lb_factory([b1, b2], workers=2, extra=STATS)
    assert wait_until(lambda: health(lb.admin_port) == 200, timeout=15)
    poller = HealthPoller(lb.admin_port)
    poller.start()
    try:
        for i in range(1, 6):
            write_config(lb, [b1, b2] if i % 2 else [b2, b1])
            lb.proc.send_signal(signal.SIGHUP)
            lb.log.wait_for("reload_done", i, timeout=15)
        # and one more second of polls after the last reload settled
        end = time.time() + 1.0
        assert wait_until(lambda: poller.results and poller.results[-1][0] > end, timeout=5)
    finally:
        results = poller.stop()
    bad = [r for r in results if r[1] != 200]
    assert bad == [], f"{len(bad)} of {len(results)} health polls failed during reloads: {bad[:5]}"
    assert len(results) > 20, len(results)
    assert len(lb.log.events("admin_ready")) == 1, "the admin process was restarted by a reload"
    # and it follows the running config (its generation) without restarting
    assert wait_until(lambda: json.loads(get(lb.admin_port, "/api/health")[2])["generation"] == 6, timeout=5)
    assert lb.log.events("admin_config_reloaded")[-1]["generation"] == 6


def test_counters_never_go_backwards_across_reload_and_worker_kill(lb_factory, backend_factory):
    b1, b2 = backend_factory("b1"), backend_factory("b2")
    lb = lb_factory([b1, b2], workers=2, extra=STATS)
    load = Load(lb.port)
    load.start()
    try:
        # some traffic counted in /metrics first
        key = ("lb_backend_requests_total", (("backend", "b1"),))
        assert wait_until(lambda: counters(lb.admin_port).get(key, 0) >= 50, timeout=15)
        before = counters(lb.admin_port)

        write_config(lb, [b1, b2])
        lb.proc.send_signal(signal.SIGHUP)
        lb.log.wait_for("reload_done", 1, timeout=15)
        after_reload = counters(lb.admin_port)
        assert went_back(before, after_reload) == []
        # still counting: the new generation's requests add to the old one's
        assert wait_until(lambda: counters(lb.admin_port).get(key, 0) > after_reload[key] + 20, timeout=30), \
            (after_reload[key], counters(lb.admin_port).get(key), load.done, get(lb.admin_port, "/api/health")[2],
             "\n".join(lb.log.lines[-30:]))

        before_kill = counters(lb.admin_port)
        ready = len(lb.log.events("worker_ready"))
        current = [e["pid"] for e in lb.log.events("worker_ready")[-2:]]  # not a draining old one
        assert set(current) <= set(live_workers(lb.proc.pid))
        os.kill(current[0], signal.SIGKILL)
        lb.log.wait_for("worker_died", 1, timeout=10)
        lb.log.wait_for("worker_ready", ready + 1, timeout=10)  # its replacement
        after_kill = counters(lb.admin_port)
        assert went_back(before_kill, after_kill) == []
        assert wait_until(lambda: counters(lb.admin_port).get(key, 0) > after_kill[key] + 20, timeout=30), \
            (after_kill[key], counters(lb.admin_port).get(key), load.done)
        assert went_back(after_kill, counters(lb.admin_port)) == []
    finally:
        load.stop()
    assert load.done > 100


def test_counters_survive_an_admin_process_restart(lb_factory, backend_factory):
    """A replaced admin process continues the counters, including those of workers
    that are gone (a retired generation), instead of starting from the live ones."""
    b1, b2 = backend_factory("b1"), backend_factory("b2")
    lb = lb_factory([b1, b2], workers=2, extra=STATS)
    load = Load(lb.port)
    load.start()
    key = ("lb_backend_requests_total", (("backend", "b1"),))
    try:
        assert wait_until(lambda: counters(lb.admin_port).get(key, 0) >= 50, timeout=15)
        write_config(lb, [b1, b2])
        lb.proc.send_signal(signal.SIGHUP)
        lb.log.wait_for("reload_done", 1, timeout=15)
        old = [e["pid"] for e in lb.log.events("worker_ready")[:2]]
        assert wait_until(lambda: not set(old) & set(live_workers(lb.proc.pid)), timeout=10)
    finally:
        load.stop()
    before = counters(lb.admin_port)
    admin_pid = next(e["pid"] for e in lb.log.events("admin_ready"))
    os.kill(admin_pid, signal.SIGKILL)
    lb.log.wait_for("admin_ready", 2, timeout=20)
    assert wait_until(lambda: health(lb.admin_port) in (200, 503), timeout=10)
    first = counters(lb.admin_port)  # at once, before the workers' next reports
    assert wait_until(lambda: (h := health(lb.admin_port)) == 200, timeout=10)
    settled = counters(lb.admin_port)
    own = ("lb_admin_",)  # the admin process's own message counters restart with it
    # (the supervisor's counters appear with its first status to the new process)
    back = [x for x in went_back(before, first) if not x[0][0].startswith(own) and x[2] is not None]
    assert back == [], back[:5]
    back = [x for x in went_back(before, settled) if not x[0][0].startswith(own)]
    assert back == [], back[:5]
    assert lb.log.events("admin_counters_loaded")
