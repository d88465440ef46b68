"""The admin process as `lb run` starts it: real workers, real backends, real
traffic.  Counts in /metrics match the requests sent, a drain through the API
takes a backend out of rotation without a reload, a reload's new request
classes reach /api/route, and a killed admin process comes back with the
operator's overrides."""

from __future__ import annotations

import os
import signal

from tests.conftest import child_processes
from tests.rawhttp import get
from tests.adminharness import RUN_TOKEN as TOKEN
from tests.adminharness import admin_call, metric_samples, wait_until

CLASSES = '[[classes]]\nname = "api"\npath_prefix = "/api/"\n'


def served_by(backend) -> int:
    return len(backend.requests())


def start(lb_factory, backends):
    lb = lb_factory(backends, workers=2, extra="[learning]\nstats_interval = 0.1\n" + CLASSES)
    wait_until(lambda: admin_call(lb, "GET", "/api/health", token=None)[0] == 200, timeout=15)
    return lb


def test_metrics_drain_reload_restart(lb_factory, backend_factory, monkeypatch):
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)  # inherited by lb and its admin process
    b1, b2 = backend_factory("b1"), backend_factory("b2")
    lb = start(lb_factory, [b1, b2])

    for _ in range(100):
        assert get(lb.port, "/x")[0] == 200
    for _ in range(20):
        assert get(lb.port, "/api/y")[0] == 200

    def counted():
        s = metric_samples(admin_call(lb, "GET", "/metrics", token=None)[1].decode())
        total = sum(v for k, v in s.items() if k.startswith("lb_backend_class_requests_total"))
        return total == 120 and s
    s = wait_until(counted, timeout=10)
    assert s['lb_backend_class_requests_total{backend="b1",class="api"}'] + \
        s['lb_backend_class_requests_total{backend="b2",class="api"}'] == 20
    assert s['lb_backend_responses_total{backend="b1",code="2xx"}'] > 0
    assert s["lb_workers_ready"] == 2 and s["lb_config_generation"] == 1

    # drain b2: the workers stop sending it new requests, no reload
    assert admin_call(lb, "POST", "/api/backends/b2/drain")[0] == 200

    def only_b1() -> bool:
        before = served_by(b2)
        for _ in range(20):
            assert get(lb.port, "/x")[0] == 200
        return served_by(b2) == before
    wait_until(only_b1, timeout=10, interval=0.2)
    assert only_b1()
    assert admin_call(lb, "POST", "/api/route", {"path": "/x"}, token=None)[1]["excluded"] == {"b2": "drained"}

    # a reload with a new request class: /api/route follows the running config
    text = lb.config.read_text().replace(CLASSES, CLASSES + '[[classes]]\nname = "heavy"\npath_prefix = "/heavy"\n')
    lb.config.write_text(text)
    lb.proc.send_signal(signal.SIGHUP)
    lb.log.wait_for("reload_done")
    wait_until(lambda: admin_call(lb, "POST", "/api/route", {"path": "/heavy/1"}, token=None)[1]["class"] == "heavy",
               timeout=10)

    # kill -9 the admin process: the supervisor starts another; the drain persists
    admin_pid = next(c.pid for c in child_processes(lb.proc.pid, "lb.admin"))
    os.kill(admin_pid, signal.SIGKILL)

    def back() -> bool:
        try:
            status, body = admin_call(lb, "GET", "/api/backends", token=None)
        except OSError:
            return False
        return status == 200 and {b["name"]: b["state"] for b in body["backends"]} == {"b1": "up", "b2": "drained"}
    wait_until(back, timeout=15, interval=0.3)
    assert admin_call(lb, "POST", "/api/backends/b2/enable")[0] == 200

    def b2_again() -> bool:
        before = served_by(b2)
        for _ in range(20):
            get(lb.port, "/x")
        return served_by(b2) > before
    wait_until(b2_again, timeout=10, interval=0.2)
