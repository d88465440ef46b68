"""Three lb instances sharing one real etcd (`[fleet]`): a backend written
with etcdctl is routed to by all three within 1 s (measured from each
worker's `fleet_applied` line), a drain flag stops new requests to it, a bad
value is skipped and counted, every member lists the others, and etcd killed
and restarted under load loses no request while every member reports
`lb_fleet_connected 0` and then catches up with what was written meanwhile."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import get
from tests.etcdserver import Etcd
from tests.test_admin_harness import metric_samples, wait_until
from tests.test_admin_lb_run import TOKEN, admin_call
from tests.test_backend_failover import Load

PREFIX = "/lb/test"


@pytest.fixture
def etcd(tmp_path):
    e = Etcd(tmp_path)
    yield e
    e.close()


def fleet_view(lb) -> dict | None:
    try:
        status, body = admin_call(lb, "GET", "/api/fleet", token=None)
    except OSError:
        return None
    return body if status == 200 else None


def metric(lb, name: str) -> float | None:
    return metric_samples(admin_call(lb, "GET", "/metrics", token=None)[1].decode()).get(name)


def start_members(lb_factory, etcd, tmp_path, n: int = 3) -> list:
    lbs = []
    for i in range(n):
        lbs.append(lb_factory([], workers=1, strategy="round_robin", backend_lines="",
                              extra=f'state_dir = "{tmp_path}/state-{i}"\n'
                                    f'[fleet]\netcd = ["{etcd.url}"]\nprefix = "{PREFIX}"\n'
                                    f'member = "m{i}"\nlease_ttl = 2\n'
                                    "[balancer]\nslow_start = 0\n[learning]\nstats_interval = 0.1\n"))
    for lb in lbs:
        wait_until(lambda: (fleet_view(lb) or {}).get("connected") is True, timeout=20, interval=0.1)
    return lbs


def put_backend(etcd, name: str, backend, **fields) -> float:
    """Write the backend with etcdctl; the time just before the write."""
    t0 = time.time()
    etcd.put(f"{PREFIX}/backends/{name}", json.dumps({"address": backend.address, **fields}))
    return t0


def applied_everywhere(lbs, name: str, t0: float, key: str = "added") -> list[float]:
    """Seconds from the write to each member's worker applying it."""
    out = []
    for lb in lbs:
        ev = wait_until(lambda: next((e for e in lb.log.events("fleet_applied")
                                      if name in e.get(key, []) and e["ts"] >= t0 - 0.05), None),
                        timeout=10, interval=0.02)
        out.append(ev["ts"] - t0)
    return out


def served(lb, backends, n: int = 10) -> set[str]:
    before = {b.name: len(b.requests()) for b in backends}
    for _ in range(n):
        assert get(lb.port, "/x")[0] == 200
    return {b.name for b in backends if len(b.requests()) > before[b.name]}


def test_three_members_follow_etcd_and_survive_its_outage(lb_factory, backend_factory, etcd, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)
    b1, b2, b3 = backend_factory("b1"), backend_factory("b2"), backend_factory("b3")
    lbs = start_members(lb_factory, etcd, tmp_path)

    # every member registers and sees the others
    for lb in lbs:
        wait_until(lambda: {m["id"] for m in (fleet_view(lb) or {}).get("members", [])} == {"m0", "m1", "m2"},
                   timeout=10, interval=0.1)
    assert get(lbs[0].port, "/x")[0] == 503  # no backend yet

    # a backend written with etcdctl: routed to by all three within 1 s
    t0 = put_backend(etcd, "b1", b1)
    delays = applied_everywhere(lbs, "b1", t0)
    assert max(delays) < 1.0, delays
    for lb in lbs:
        assert served(lb, [b1]) == {"b1"}
        assert fleet_view(lb)["backends"] == ["b1"]
        sources = {b["name"]: b["source"] for b in admin_call(lb, "GET", "/api/backends", token=None)[1]["backends"]}
        assert sources == {"b1": "etcd"}

    # a second one, then a drain flag on the first: no new requests to it anywhere
    t0 = put_backend(etcd, "b2", b2)
    assert max(applied_everywhere(lbs, "b2", t0)) < 1.0
    t0 = put_backend(etcd, "b1", b1, drain=True)
    for lb in lbs:
        wait_until(lambda: served(lb, [b1, b2], 6) == {"b2"}, timeout=1.0 + 2, interval=0.02)
    assert time.time() - t0 < 3.0

    # a bad value is skipped and counted; nothing else changes
    etcd.put(f"{PREFIX}/backends/bad", "not json")
    for lb in lbs:
        wait_until(lambda: metric(lb, "lb_fleet_invalid_backends") == 1, timeout=5, interval=0.05)
        assert served(lb, [b1, b2], 4) == {"b2"}
    assert lbs[0].log.wait_for("fleet_backend_invalid")[0]["backend"] == "bad"

    # etcd killed and restarted under load: no request lost, members catch up
    loads = [Load(lb.port) for lb in lbs]
    for load in loads:
        load.start()
    try:
        etcd.kill()
        for lb in lbs:
            wait_until(lambda: metric(lb, "lb_fleet_connected") == 0, timeout=10, interval=0.05)
        for load in loads:
            n = len(load.results)
            wait_until(lambda: len(load.results) > n + 20, timeout=10, interval=0.02)  # still serving
        etcd.start()
        for lb in lbs:
            wait_until(lambda: metric(lb, "lb_fleet_connected") == 1, timeout=15, interval=0.05)
        t0 = put_backend(etcd, "b3", b3)
        assert max(applied_everywhere(lbs, "b3", t0)) < 1.0
    finally:
        for load in loads:
            load.stop.set()
        for load in loads:
            load.join(10)
    for load in loads:
        assert load.results and load.errors() == [], load.errors()[:5]
        assert {b for _, b in load.results} <= {"b2", "b3"}
    for lb in lbs:
        assert served(lb, [b1, b2, b3], 10) == {"b2", "b3"}
        assert lb.log.events("fleet_disconnected")

    # a backend deleted: gone everywhere
    t0 = time.time()
    etcd.ctl("del", f"{PREFIX}/backends/b3")
    assert max(applied_everywhere(lbs, "b3", t0, key="removed")) < 1.0
