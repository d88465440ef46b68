"""SIGHUP reloads: new generation first, no request lost, bad files and failed boots change nothing."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import free_port, wait_port
from tests.rawhttp import RawConn
from tests.supervision import (
    Client,
    SwappableLB,
    backends_seen,
    fetch,
    live_workers,
    still_alive,
    wait_until,
    write_config,
)

# -- reload --------------------------------------------------------------------------------


def test_sighup_replaces_workers_and_switches_backends(backend_factory, lb_factory):
    b1, b2 = backend_factory("b1"), backend_factory("b2")
    lb = lb_factory([b1], workers=2)
    old = live_workers(lb.proc.pid)
    assert len(old) == 2
    assert backends_seen(lb.port) == {"b1"}

    # A slow request in flight on an old worker must finish while that worker drains.
    slow = RawConn(lb.port, timeout=10)
    try:
        slow.send(b"GET /slow/1000 HTTP/1.1\r\nHost: lb.test\r\n\r\n")
        b1.wait_request("/slow/1000")  # in flight on an old worker
        write_config(lb, [b2])
        lb.proc.send_signal(signal.SIGHUP)
        start = lb.log.wait_for("reload_start", 1, timeout=5)[0]
        done = lb.log.wait_for("reload_done", 1, timeout=10)[0]
        assert start["generation"] == done["generation"] == 2
        assert start["backends"] == 1
        resp = slow.read_response()
    finally:
        slow.close()
    assert resp.status == 200 and resp.header("x-backend") == "b1"

    names = [e["event"] for e in lb.log.events()]
    assert names.index("reload_start") < names.index("reload_done")
    new_ready = lb.log.events("worker_ready")[2:]
    assert len(new_ready) == 2 and sorted(e["slot"] for e in new_ready) == [0, 1]
    new = sorted(e["pid"] for e in new_ready)
    assert not set(new) & set(old)
    assert still_alive(old, timeout=5) == [], "old workers did not exit after draining"
    assert live_workers(lb.proc.pid) == new
    assert backends_seen(lb.port) == {"b2"}
    assert lb.log.events("worker_died") == []

    # Weights: a second reload to b1 (weight 3) + b2 (weight 1).
    write_config(lb, [b1, b2], strategy="weighted_round_robin", weights={"b1": 3, "b2": 1})
    lb.proc.send_signal(signal.SIGHUP)
    done = lb.log.wait_for("reload_done", 2, timeout=10)[1]
    assert done["generation"] == 3
    assert still_alive(new, timeout=5) == []
    counts = {"b1": 0, "b2": 0}
    for _ in range(40):
        status, name = fetch(lb.port)
        assert status == 200
        counts[name] += 1
    assert counts["b1"] > counts["b2"] > 0, counts


def test_reloads_under_steady_load_lose_no_request(backend_factory, lb_factory):
    b1, b2 = backend_factory("b1"), backend_factory("b2")
    lb = lb_factory([b1], workers=2)
    wait_port(lb.port)
    keepalive = Client(lb.port, keepalive=True)
    fresh = Client(lb.port, keepalive=False)
    keepalive.start()
    fresh.start()
    sets = [[b2], [b1, b2], [b1]]
    start_ts, done_ts = [], []
    try:
        time.sleep(0.5)
        for i, backends in enumerate(sets, 1):
            write_config(lb, backends)
            lb.proc.send_signal(signal.SIGHUP)
            done_ts.append(lb.log.wait_for("reload_done", i, timeout=10)[i - 1]["ts"])
            start_ts.append(lb.log.events("reload_start")[i - 1]["ts"])
            time.sleep(1.0)
    finally:
        ka = keepalive.stop()
        nc = fresh.stop()

    assert lb.log.events("reload_rejected") == [] and lb.log.events("reload_failed") == []
    assert Client.failures(ka) == [], (f"keep-alive client: {Client.failures(ka)[:5]} of {len(ka)}\n"
                                       + "\n".join(lb.log.lines[-40:]))
    assert Client.failures(nc) == [], f"new-connection client: {Client.failures(nc)[:5]} of {len(nc)}"
    assert len(ka) > 200 and len(nc) > 100, (len(ka), len(nc))

    # Traffic follows each new backend set.  A request that began well after reload_done
    # (old workers are told to drain at that moment) and ended before the next
    # reload_start (the next generation accepts as soon as it is ready) must be served
    # by the new set.
    windows = list(zip(done_ts, start_ts[1:] + [float("inf")]))
    for (begin, end), backends in zip(windows, sets):
        allowed = {b.name for b in backends}
        late = [r for r in nc if begin + 0.3 < r["t0"] and r["t1"] < end]
        assert late, f"no request between reloads at {begin}"
        assert {r["backend"] for r in late} <= allowed, (allowed, {r["backend"] for r in late})
    # The keep-alive client also moved over to the last generation.
    assert {r["backend"] for r in ka if r["t0"] > done_ts[-1] + 0.3} == {"b1"}

    # Every old generation has exited; only the last one is left.
    lb.log.wait_for("worker_exit", 6, timeout=5)
    last = sorted(e["pid"] for e in lb.log.events("worker_ready")[-2:])
    assert wait_until(lambda: live_workers(lb.proc.pid) == last, timeout=5), live_workers(lb.proc.pid)
    assert lb.log.events("worker_died") == []


def test_reload_with_invalid_config_is_rejected_and_old_config_kept(backend_factory, lb_factory):
    b1, b2 = backend_factory("b1"), backend_factory("b2")
    lb = lb_factory([b1], workers=2)
    pids = live_workers(lb.proc.pid)
    good = lb.config.read_text()

    # A TOML syntax error, pointing at a different backend.
    lb.config.write_text(good.replace(b1.address, b2.address) + "listen = \n")
    lb.proc.send_signal(signal.SIGHUP)
    rejected = lb.log.wait_for("reload_rejected", 1, timeout=5)[0]
    assert str(lb.config) in rejected["error"], rejected
    assert "TOML" in rejected["error"] or "toml" in rejected["error"], rejected

    # A valid file that changes the listen address: needs a restart, so also rejected.
    lb.config.write_text(good.replace(f"127.0.0.1:{lb.port}", f"127.0.0.1:{free_port()}", 1))
    lb.proc.send_signal(signal.SIGHUP)
    rejected = lb.log.wait_for("reload_rejected", 2, timeout=5)[1]
    assert str(lb.config) in rejected["error"] and "listen" in rejected["error"], rejected

    time.sleep(0.3)
    assert lb.log.events("reload_start") == []
    assert live_workers(lb.proc.pid) == pids
    assert len(lb.log.events("worker_ready")) == 2
    assert backends_seen(lb.port, 20) == {"b1"}
    assert lb.proc.poll() is None

    # Once the file is fixed, a reload goes through.
    write_config(lb, [b2])
    lb.proc.send_signal(signal.SIGHUP)
    lb.log.wait_for("reload_done", 1, timeout=10)
    assert backends_seen(lb.port) == {"b2"}


def test_two_sighups_in_quick_succession_end_on_the_new_config(backend_factory, lb_factory):
    # Config tools often signal twice (e.g. one reload per changed file).
    b1, b2 = backend_factory("b1"), backend_factory("b2")
    lb = lb_factory([b1], workers=2)
    old = live_workers(lb.proc.pid)
    write_config(lb, [b2])
    lb.proc.send_signal(signal.SIGHUP)
    time.sleep(0.05)
    lb.proc.send_signal(signal.SIGHUP)
    lb.log.wait_for("reload_start", 2, timeout=5)
    try:
        lb.log.wait_for("reload_done", 1, timeout=6)
    except TimeoutError:
        workers = live_workers(lb.proc.pid)
        pytest.fail(f"no reload_done within 6 s of two SIGHUPs 50 ms apart; "
                    f"{len(workers)} workers running (expected 2); reload events: "
                    f"{[e for e in lb.log.events() if e['event'].startswith('reload')]}")
    assert still_alive(old, timeout=5) == []
    assert wait_until(lambda: len(live_workers(lb.proc.pid)) == 2, timeout=5), live_workers(lb.proc.pid)
    assert backends_seen(lb.port) == {"b2"}
    assert lb.log.events("reload_failed") == []




@pytest.fixture
def swappable(tmp_path):
    made = []

    def make(*a, **kw):
        s = SwappableLB(tmp_path, *a, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()



def test_failed_reloads_keep_the_old_workers_serving(backend_factory, swappable):
    b1 = backend_factory("b1")
    lb = swappable([b1], workers=2)
    pids = live_workers(lb.proc.pid)
    assert backends_seen(lb.port) == {"b1"}
    lb.break_workers()
    for i in range(1, 6):
        if lb.proc.poll() is not None:
            break
        lb.proc.send_signal(signal.SIGHUP)
        try:
            lb.log.wait_for("reload_failed", i, timeout=10)  # (a loaded host boots python slowly)
        except TimeoutError:
            break
        time.sleep(0.2)
    running = lb.proc.poll() is None
    events = [e["event"] for e in lb.log.events()]
    assert "simulated broken deploy" in "\n".join(lb.log.lines)
    assert running and "supervisor_giving_up" not in events, (
        f"lb stopped after {events.count('reload_failed')} failed reloads while its old workers "
        f"were serving: {[e for e in lb.log.events() if e['event'] in ('reload_failed', 'supervisor_giving_up', 'supervisor_stopping', 'supervisor_exit')]}")
    assert events.count("reload_failed") == 5
    assert live_workers(lb.proc.pid) == pids
    assert backends_seen(lb.port) == {"b1"}
    # With the package repaired, a reload goes through.
    lb.fix_workers()
    lb.proc.send_signal(signal.SIGHUP)
    lb.log.wait_for("reload_done", 1, timeout=10)
    assert backends_seen(lb.port) == {"b1"}


def test_after_a_failed_reload_a_respawned_worker_uses_the_running_config(backend_factory, swappable):
    b1, b2 = backend_factory("b1"), backend_factory("b2")
    lb = swappable([b1], workers=2)
    pids = live_workers(lb.proc.pid)
    lb.break_workers()
    write_config(lb, [b2])
    lb.proc.send_signal(signal.SIGHUP)
    lb.log.wait_for("reload_failed", 1, timeout=5)
    # The other new worker was killed with the failed reload; give it a moment to go.
    assert wait_until(lambda: live_workers(lb.proc.pid) == pids, timeout=3), live_workers(lb.proc.pid)
    assert backends_seen(lb.port) == {"b1"}  # the reload did not happen
    lb.fix_workers()
    os.kill(pids[0], signal.SIGKILL)
    lb.log.wait_for("worker_ready", 3, timeout=5)
    assert backends_seen(lb.port, 30) == {"b1"}, "workers of one generation serve different configs"


def test_reloads_with_the_ml_strategy_restart_inference_and_lose_no_request(backend_factory, lb_factory):
    from tests.load import Load, stop_all

    b1, b2 = backend_factory("b1"), backend_factory("b2")
    lb = lb_factory([b1, b2], workers=2, strategy="ml")
    lb.log.wait_for("inference_ready", timeout=20)
    load = Load(lb.port)
    load.start()
    try:
        for i, weights in enumerate(({"b1": 3, "b2": 1}, {"b1": 1, "b2": 5}), 1):
            time.sleep(0.8)
            write_config(lb, [b1, b2], strategy="ml", weights=weights)
            lb.proc.send_signal(signal.SIGHUP)
            lb.log.wait_for("reload_done", i, timeout=15)
            lb.log.wait_for("inference_ready", i + 1, timeout=20)  # restarted with the new config
        time.sleep(0.8)
    finally:
        stop_all([load])
    assert load.errors() == [], load.errors()[:5]
    assert len(load.results) > 200
    assert lb.log.events("child_died") == []  # restarted on purpose, not crashed
