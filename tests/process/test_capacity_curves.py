"""GET /api/capacity per backend from the admin's instance-wide load curves
(lb/admin/loadcurves.py), on a running lb with two workers and a strategy
that learns no curves of its own, in front of real simulated backends of
known slot counts (bench/scenario_backend.py)."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT
from tests.rawhttp import get
from tests.supervision import wait_until

sys.path.insert(0, str(ROOT / "bench"))

import loadgen  # noqa: E402
import scenarios as scn  # noqa: E402


def test_two_workers_answers_give_single_slot_backends_their_service_time(lb_factory, scenario_backends):
    """Two backends that each serve one request at a time, loaded at about 70%
    of their throughput by least connections over two workers.  A worker's
    own curve would read a share of a slot and a service time up to half
    again too long (its answers queue behind the other worker's requests);
    the admin, counting both workers' requests in flight, measures each
    (`known`) with one slot and the backend's own service time.  (The
    requests are evenly spaced, and lb's event loops read answers
    milliseconds late on a busy host: neither may raise the count.)  The
    fleet's capacity, headroom and recommended backends then show in the API
    and as Prometheus gauges while traffic flows."""
    sc = scn.get("steady1002")  # c1, c2: one slot each, ~25 and ~29 ms median
    assert [b.capacity for b in sc.backends] == [1, 1]
    ports, _ = scenario_backends(sc.name, 600)
    backends = [SimpleNamespace(name=b.name, address=f"127.0.0.1:{p}") for b, p in zip(sc.backends, ports)]
    lb = lb_factory(backends, strategy="least_connections", workers=2)
    rate = 0.7 * scn.capacity_rate(sc.backends, 0.0)
    schedule = [(i / rate, 0) for i in range(int(rate * 12))]
    records, _ = loadgen.run_load(lb.port, schedule, timeout=5.0)
    assert sum(r[2] == 200 for r in records) >= 0.99 * len(schedule)

    def backends_view():
        v = json.loads(get(lb.admin_port, "/api/capacity")[2])["backends"]
        return v if all(n in v and v[n]["known"] for n in ("c1", "c2")) else None

    view = wait_until(backends_view, 15, 0.2)
    assert view, json.loads(get(lb.admin_port, "/api/capacity")[2])["backends"]
    for spec in sc.backends:
        est = view[spec.name]
        mean_ms = spec.median_ms * math.exp(spec.sigma ** 2 / 2)
        assert est["slots"] == 1, est
        assert 0.8 * mean_ms < est["service_ms"] < 1.25 * mean_ms, (spec, est)
        assert 0 < est["capacity_rps"] < est["saturation_rps"]

    # The fleet's figures, in the API and as gauges, while traffic flows.
    def fleet_view():
        for _ in range(20):
            assert get(lb.port, "/")[0] == 200
        v = json.loads(get(lb.admin_port, "/api/capacity")[2])
        return v if v["fleet"]["headroom"] is not None and v["fleet"]["known"] else None

    v = wait_until(fleet_view, 15, 0.1)
    assert v, json.loads(get(lb.admin_port, "/api/capacity")[2])["fleet"]
    fleet = v["fleet"]
    assert fleet["capacity_rps"] >= max(b["capacity_rps"] for b in v["backends"].values())
    assert fleet["headroom"] == pytest.approx(fleet["capacity_rps"] / fleet["load_rps"] - 1, rel=1e-3, abs=1e-3)
    assert fleet["recommended_backends"] >= 1 and fleet["routable_backends"] == 2
    metrics = get(lb.admin_port, "/metrics")[2].decode()
    gauges = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line.startswith(("lb_fleet_", "lb_backend_capacity_rps"))}
    for name in ("lb_fleet_capacity_rps", "lb_fleet_recommended_backends", "lb_fleet_load_rps"):
        assert gauges.get(name, -1) > 0, (name, gauges)
    assert "lb_fleet_headroom" in gauges, gauges  # (capacity / load - 1: negative when over capacity)
    assert gauges['lb_backend_capacity_rps{backend="c1",known="true"}'] > 0, gauges


def test_a_backend_never_loaded_past_one_request_reports_a_lower_bound(lb_factory, scenario_backends):
    """One request at a time to a backend that serves eight at once: nothing
    shows where it would queue, so its capacity is reported as what one slot
    gives, flagged `known: false` with a note, not as a guess."""
    sc = scn.get("identical")  # eight slots, 5 ms each
    ports, _ = scenario_backends(sc.name, 600)
    lb = lb_factory([SimpleNamespace(name="b1", address=f"127.0.0.1:{ports[0]}")], strategy="least_connections")
    for _ in range(300):
        assert get(lb.port, "/")[0] == 200

    def seen():
        v = json.loads(get(lb.admin_port, "/api/capacity")[2])
        return v if "b1" in v["backends"] else None

    view = wait_until(seen, 10, 0.2)
    assert view, json.loads(get(lb.admin_port, "/api/capacity")[2])
    est = view["backends"]["b1"]
    assert est["known"] is False and "at least" in est["note"], est
    assert est["slots"] == 1 and 0 < est["capacity_rps"] < est["saturation_rps"]
    assert view["fleet"]["known"] is False
