"""DNS discovery against a real DNS server (dnsmasq): backends given by a host
name or an SRV name follow the records within `discovery.interval`, a record
removed takes its backend out (requests in flight finish), and a DNS server
that stops answering leaves the pool as it was."""

from __future__ import annotations

import time

import pytest

from tests.conftest import free_port
from tests.rawhttp import get
from tests.dnsserver import Dnsmasq
from tests.adminharness import metric_samples, wait_until
from tests.adminharness import RUN_TOKEN as TOKEN
from tests.adminharness import admin_call


def fleet(lb) -> dict[str, dict]:
    return {b["name"]: b for b in admin_call(lb, "GET", "/api/backends", token=None)[1]["backends"]
            if b["source"] is not None}


def served(backends, lb, n: int = 30) -> set[str]:
    """Names of the backends that answered `n` requests through lb."""
    before = {b.name: len(b.requests()) for b in backends}
    for _ in range(n):
        assert get(lb.port, "/x")[0] == 200
    return {b.name for b in backends if len(b.requests()) > before[b.name]}


def start_lb(lb_factory, dns: Dnsmasq, entries: str, tmp_path, workers: int = 2):
    lb = lb_factory([], workers=workers, backend_lines=entries,
                    extra=f'state_dir = "{tmp_path}/state"\n'
                          f'[discovery]\nresolvers = ["{dns.resolver}"]\ninterval = 1\n'
                          "[learning]\nstats_interval = 0.1\n")
    wait_until(lambda: admin_call(lb, "GET", "/api/health", token=None)[0] == 200, timeout=15)
    return lb


def test_a_records_followed_and_kept_when_dns_fails(lb_factory, backend_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)
    port = free_port()
    b2, b3, b4 = (backend_factory(f"b{i}", port=port, host=f"127.0.0.{i}") for i in (2, 3, 4))
    dns = Dnsmasq(tmp_path, {"api.test": ["127.0.0.2", "127.0.0.3"]})
    try:
        lb = start_lb(lb_factory, dns, f'[[backends]]\naddress = "api.test:{port}"\nname = "api"', tmp_path)
        # a worker that starts with backends given by name waits for them: no 503 at start
        assert get(lb.port, "/x")[0] == 200
        assert set(fleet(lb)) == {f"api@127.0.0.2:{port}", f"api@127.0.0.3:{port}"}
        assert all(b["source"] == "dns" for b in fleet(lb).values())
        wait_until(lambda: served([b2, b3], lb) == {"b2", "b3"}, timeout=10, interval=0.1)

        # a record removed: that backend leaves within the interval (1 s) + a look-up
        t0 = time.monotonic()
        dns.set_hosts({"api.test": ["127.0.0.2"]})
        wait_until(lambda: served([b2, b3], lb, 10) == {"b2"}, timeout=10, interval=0.05)
        assert time.monotonic() - t0 < 3.0
        assert set(fleet(lb)) == {f"api@127.0.0.2:{port}"}

        # a record added: routed to
        dns.set_hosts({"api.test": ["127.0.0.2", "127.0.0.4"]})
        wait_until(lambda: served([b2, b4], lb) == {"b2", "b4"}, timeout=10, interval=0.1)

        # the DNS server stops: look-ups fail, the pool stays as it was
        dns.stop()
        lb.log.wait_for("discovery_failed", timeout=10)
        assert served([b2, b4], lb) == {"b2", "b4"}
        assert set(fleet(lb)) == {f"api@127.0.0.2:{port}", f"api@127.0.0.4:{port}"}

        # ... and a restarted admin process starts from the last known set
        admin = next(c for c in __import__("tests.conftest").conftest.child_processes(lb.proc.pid, "lb.admin"))
        admin.kill()
        wait_until(lambda: _fleet_or_none(lb) == {f"api@127.0.0.2:{port}", f"api@127.0.0.4:{port}"},
                   timeout=15, interval=0.2)
        assert served([b2, b4], lb) == {"b2", "b4"}
        s = metric_samples(admin_call(lb, "GET", "/metrics", token=None)[1].decode())
        assert s['lb_fleet_backends{source="dns"}'] == 2
        wait_until(lambda: metric_samples(admin_call(lb, "GET", "/metrics", token=None)[1].decode()).get(
            'lb_discovery_lookups_total{backend="api",result="error"}', 0) >= 1, timeout=10)
    finally:
        dns.stop()


def _fleet_or_none(lb):
    try:
        return set(fleet(lb))
    except OSError:
        return None


def test_srv_records_lowest_priority_weights_and_changes(lb_factory, backend_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)
    b1, b2, b3 = backend_factory("b1"), backend_factory("b2"), backend_factory("b3")
    srv = "_http._tcp.api.test"
    records = [(srv, "one.test", b1.port, 0, 10), (srv, "two.test", b2.port, 0, 30),
               (srv, "spare.test", b3.port, 1, 10)]  # priority 1: only when priority 0 has none
    hosts = {"one.test": ["127.0.0.1"], "two.test": ["127.0.0.1"], "spare.test": ["127.0.0.1"]}
    dns = Dnsmasq(tmp_path, hosts, records)
    try:
        lb = start_lb(lb_factory, dns, f'[[backends]]\nsrv = "{srv}"\nname = "api"',
                      tmp_path)
        f = fleet(lb)
        assert set(f) == {f"api@127.0.0.1:{b1.port}", f"api@127.0.0.1:{b2.port}"}
        assert {b["config_weight"] for b in f.values()} == {10, 30}
        wait_until(lambda: served([b1, b2, b3], lb, 40) == {"b1", "b2"}, timeout=10, interval=0.1)

        # the SRV set changes (the server restarted with other records): two.test leaves,
        # with a request in flight on it that still completes
        slow = __import__("threading").Thread
        result = {}

        def long_request():
            result["status"] = get(lb.port, "/slow/1500")[0]
        inflight = None
        for _ in range(20):  # until one lands on b2 (round robin over two)
            n = len([r for r in b2.requests() if r["target"] == "/slow/1500"])
            inflight = slow(target=long_request)
            inflight.start()
            wait_until(lambda: len([r for r in b1.requests() + b2.requests()
                                    if r["target"] == "/slow/1500"]) > 0, timeout=5, interval=0.02)
            if len([r for r in b2.requests() if r["target"] == "/slow/1500"]) > n:
                break
            inflight.join()
        dns.restart([(srv, "one.test", b1.port, 0, 10), (srv, "spare.test", b3.port, 1, 10)])
        wait_until(lambda: set(fleet(lb)) == {f"api@127.0.0.1:{b1.port}"}, timeout=10, interval=0.1)
        assert served([b1, b2, b3], lb, 20) == {"b1"}
        inflight.join(10)
        assert result["status"] == 200
    finally:
        dns.stop()


@pytest.mark.parametrize("entry", ['address = "nothing.test:80"', 'srv = "_http._tcp.nothing.test"'])
def test_name_never_resolved_is_logged_not_fatal(lb_factory, backend_factory, tmp_path, entry, monkeypatch):
    """A name with no records: lb serves its other backends, says why the name has none."""
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)
    b1 = backend_factory("b1")
    dns = Dnsmasq(tmp_path, {})
    try:
        lines = f'[[backends]]\naddress = "{b1.address}"\nname = "b1"\n[[backends]]\n{entry}\nname = "gone"'
        lb = start_lb(lb_factory, dns, lines, tmp_path, workers=1)
        ev = lb.log.wait_for("discovery_failed", timeout=10)[0]
        # (dnsmasq refuses names it has no records for: an error, not an empty answer)
        assert ev["backend"] == "gone" and ev["result"] in ("empty", "error") and ev["kept"] == 0
        assert ev["error"]
        assert set(fleet(lb)) == {"b1"}
        assert served([b1], lb, 5) == {"b1"}
    finally:
        dns.stop()
