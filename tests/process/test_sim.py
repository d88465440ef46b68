"""The discrete-event simulator (bench/sim.py): deterministic, and it shows the
known behaviours of the real strategies it runs (exact, fast assertions)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import scenarios as scn  # noqa: E402
import sim  # noqa: E402

import inference.engine  # noqa: E402, F401 - the simulator's ml policy runs it: a broken import fails here
from inference import traces  # noqa: E402


def run(name: str, policy: str, **kw) -> sim.Simulation:
    s = sim.Simulation(scn.get(name), policy, **kw)
    s.run()
    return s


def test_same_seed_same_run_other_seed_other_run():
    a = run("slowdown", "p2c_ewma", duration=8, seed=3)
    b = run("slowdown", "p2c_ewma", duration=8, seed=3)
    c = run("slowdown", "p2c_ewma", duration=8, seed=4)
    assert len(a.records) > 5000
    assert a.records == b.records
    assert a.summary().as_dict() == b.summary().as_dict()
    assert a.records != c.records


def test_every_request_has_exactly_one_outcome():
    s = run("coldjoin", "round_robin", duration=6, workers=3)
    assert len(s.records) == len(s.arrivals)
    assert sorted(r[0] for r in s.records) == [t for t, _ in s.arrivals]
    # Before b4 joins its refused connects are retried elsewhere: nothing fails,
    # and b4 answers nothing.
    before = [r for r in s.records if r[0] < 0.4 * 6 - 0.01]
    assert before and all(r[2] == 200 and r[3] != "b4" for r in before)
    assert any(r[3] == "b4" for r in s.records if r[0] > 0.5 * 6)


def test_least_connections_herds_onto_the_fast_failing_backend():
    s = run("fastfail", "least_connections", duration=10).summary()
    rr = run("fastfail", "round_robin", duration=10).summary()
    assert s.share["b4"] > 0.4
    assert s.share["b4"] > 2 * max(s.share["b1"], s.share["b2"], s.share["b3"])
    assert s.error_rate > 0.35  # 90% of the requests it sends there fail
    assert rr.error_rate < 0.25  # round robin only sends it a quarter


def test_p2c_ewma_beats_round_robin_on_heterogeneous_backends():
    p2c = run("heterogeneous", "p2c_ewma", duration=10).summary()
    rr = run("heterogeneous", "round_robin", duration=10).summary()
    assert p2c.p99 < 0.2 * rr.p99
    assert p2c.error_rate == 0.0 < rr.error_rate  # round robin overflows "tiny" into timeouts
    assert p2c.share["big"] > p2c.share["medium"] > p2c.share["small"] > p2c.share["tiny"]


def test_ml_is_driven_by_the_inference_engine():
    s = run("identical", "ml", duration=3, workers=2)
    assert s.bridge is not None, s.note
    ticks = sum(s.bridge.modes.values())
    assert ticks == 29  # one table per 0.1 simulated s, the first at 0.1 s
    for w in s.workers:
        assert w.strategy.table is not None
        assert w.strategy.table.seq == ticks
        assert w.strategy.table.backends == ["b1", "b2", "b3", "b4"]
    assert s.note  # the modes the tables were in


def test_ml_with_the_shipped_model_sends_heavy_requests_where_they_are_fast():
    """Per-class service times and slot counts keep /heavy off the small backends,
    which connection counting and P2C-EWMA cannot see (the 0.6x p99 target)."""
    # 20 s: the first second (fallback until the model's track record builds) weighs less
    ml = run("heterogeneous", "ml", duration=20)
    p2c = run("heterogeneous", "p2c_ewma", duration=20).summary()
    s = ml.summary()
    assert s.note.startswith("learned"), s.note
    assert s.p99 < 0.6 * p2c.p99
    # tiny (2 x 20 ms) is the slowest place for every class: it gets a small
    # part of P2C-EWMA's share, but it keeps getting requests (a backend not
    # heard from for a second is explored)
    assert 0.0005 < s.share["tiny"] < 0.3 * p2c.share["tiny"]


def test_ml_avoids_the_fast_failing_backend_and_keeps_looking_at_it():
    """b4 fails 90% of its requests fast.  ml sends it almost nothing (the
    guard's P2C-EWMA share does not send to a backend whose last answer
    failed), but exploration keeps looking at it every few seconds (at most
    every 10 s), so a recovery would be found."""
    s = run("fastfail", "ml", duration=20).summary()
    lc = run("fastfail", "least_connections", duration=20).summary()
    assert s.error_rate < 0.003 < 0.4 < lc.error_rate
    assert 3 <= round(s.share["b4"] * s.requests) < 0.003 * s.requests


def test_ml_without_an_inference_process_routes_by_its_load_curves():
    """The `ml-curves` ablation: no engine, no table; every worker routes by its own
    curves (lb's fallback when no table may route), not by P2C-EWMA."""
    ml = run("heterogeneous", "ml-curves", duration=10)
    assert ml.bridge is None
    assert all(w.strategy.reason == "no_table" and not w.strategy.usable for w in ml.workers)
    s, p2c = ml.summary(), run("heterogeneous", "p2c_ewma", duration=10).summary()
    # about P2C-EWMA's shares overall, but each class where it is served fastest
    assert s.p99 < 0.6 * p2c.p99


def test_ml_traces_are_readable_by_the_training_code(tmp_path):
    s = run("heterogeneous", "ml", duration=4, traces=str(tmp_path))
    assert s.bridge is not None, s.note
    data = traces.read([str(tmp_path)])
    n = len(data["latency"])
    assert n > 100
    assert set(data["backend"]) <= {"big", "medium", "small", "tiny"}
    assert set(data["cls"]) == {"default", "heavy"}
    assert (data["latency"] > 0).all()


def test_any_policy_feeds_traces_to_the_engine(tmp_path):
    s = run("fastfail", "random", duration=3, traces=str(tmp_path))
    assert s.bridge is not None and s.note == ""
    data = traces.read([str(tmp_path / "sim-fastfail-random-seed1.npz")])
    failing = data["backend"] == "b4"
    assert 0.15 < failing.mean() < 0.35  # random routing: about a quarter
    assert (~data["ok"][failing]).mean() > 0.8


def test_the_floor_is_below_every_policy_and_p2c_sits_on_it_in_slowdown():
    sc = scn.get("slowdown")
    s = run("slowdown", "p2c_ewma", duration=20, workers=2)
    floor = scn.floor(sc, s.arrivals, 20, 1)
    assert floor.requests == len(s.arrivals)
    for policy in ("round_robin", "least_connections"):
        other = run("slowdown", policy, duration=20, workers=2).summary()
        assert other.p99 > floor.p99 and other.p50 > floor.p50
    p2c = s.summary()
    # The slowed backend is avoided so well that p99 is the service-time floor's
    # (hops and a little queueing on top): 0.6x of it is below what any router can do.
    assert floor.p99 < p2c.p99 < 1.1 * floor.p99
    # The floor follows the scenario: heterogeneous's is set by its fastest backend.
    het = scn.get("heterogeneous")
    sched = scn.run_schedule(het, 20, None, 1)
    assert scn.floor(het, sched, 20).p50 < scn.floor(sc, s.arrivals, 20).p50


def test_the_reference_that_knows_the_fleet_sits_near_the_floor():
    """`known` (not an lb strategy) reads every backend's true slots, service
    times, phases and queue: in bursts it hardly needs the slow backends, so
    it sits on the floor, below every policy that has to learn the fleet;
    it sends nothing to a backend before it joins, nor to one failing 90%."""
    s = run("bursts", "known", duration=8)
    known = s.summary()
    floor = scn.floor(scn.get("bursts"), s.arrivals, 8, 1)
    assert known.error_rate == 0.0
    assert known.share["slow1"] + known.share["slow2"] < 0.002  # (prequal sends them 9%)
    # (the floor draws its own service times: within sampling noise of it)
    assert 0.95 * floor.p99 < known.p99 < 1.05 * floor.p99
    for policy in ("prequal", "ml"):
        assert run("bursts", policy, duration=8).summary().p99 > known.p99, policy
    cold = run("coldjoin", "known", duration=6)
    assert all(w.backends[3].connect_errors == 0 for w in cold.workers)
    assert any(r[3] == "b4" for r in cold.records)  # it does join
    failing = run("fastfail", "known", duration=6).summary()
    assert failing.error_rate < 0.01 and failing.share["b4"] < 0.01


def test_cli_table_and_bad_usage():
    p = subprocess.run([sys.executable, "bench/sim.py", "--scenario", "identical", "--duration", "2",
                        "--policies", "round_robin,random"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "round_robin" in p.stdout and "% b4" in p.stdout
    assert "floor (each request alone on the fastest healthy backend): p50 " in p.stdout
    for bad in (["--scenario", "nope"], ["--policies", "fastest"], ["--duration", "0"]):
        p = subprocess.run([sys.executable, "bench/sim.py", *bad], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2
        assert "Traceback" not in p.stderr and "error:" in p.stderr
