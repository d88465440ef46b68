"""Honest evaluation: random training fleets (bench/fleets.py) kept apart from the
evaluation set, the added evaluation scenarios, the simulator's ablations, two lb
instances on one fleet, and the time-to-divert measure."""

from __future__ import annotations

import math
import random
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import fleets  # noqa: E402
import scenario_report as report  # noqa: E402
import scenarios as scn  # noqa: E402
import sim  # noqa: E402
import sim_model  # noqa: E402

import inference.engine  # noqa: E402, F401 - the simulator's ml policy runs it: a broken import fails here
from inference import traces  # noqa: E402

NEW_SCENARIOS = ("spread16", "spread64", "affinity", "drift", "twolb")


# -- the generator ------------------------------------------------------------------------------


def test_training_and_evaluation_seeds_are_disjoint():
    assert set(fleets.TRAINING_SEEDS).isdisjoint(fleets.EVALUATION_SEEDS)
    assert (fleets.TRAINING_SEEDS.start, fleets.TRAINING_SEEDS.stop) == (1000, 2000)
    assert (fleets.EVALUATION_SEEDS.start, fleets.EVALUATION_SEEDS.stop) == (1, 100)
    # the seeds of the fixed evaluation set's runs (bench/sim.py and quality.py use 1-9)
    assert fleets.TRAINING_SEEDS.start > 9
    assert fleets.training_seeds(3) == [1000, 1001, 1002]
    for bad in ((5, 1), (1, 999), (2, 1999)):
        with pytest.raises(ValueError):
            fleets.training_seeds(bad[0], first=bad[1])


def test_a_seed_gives_the_same_fleet_and_another_seed_another():
    assert fleets.generate(1234) == fleets.generate(1234)
    assert scn.get("fleet1234") == fleets.generate(1234)
    assert fleets.generate(1234) != fleets.generate(1235)
    assert fleets.generate(7) != fleets.generate(1007)
    with pytest.raises(ValueError):
        scn.get("fleetx")


def test_generated_fleets_cover_the_ranges_asked_for():
    fl = [fleets.generate(s) for s in range(1000, 1300)]
    sizes = [len(f.backends) for f in fl]
    assert min(sizes) == 1 and max(sizes) > 128 and max(sizes) <= 256
    assert sum(1 for n in sizes if n <= 4) > 30 and sum(1 for n in sizes if n >= 64) > 30
    caps = [b.capacity for f in fl for b in f.backends]
    assert min(caps) == 1 and 16 < max(caps) <= 32
    spreads = []
    for f in fl:
        med = [b.median_ms for b in f.backends]
        spreads.append(max(med) / min(med))
        load = f.rate / scn.capacity_rate(f.backends, f.heavy_share)
        assert 0.3 - 1e-3 <= load <= 0.95 + 1e-3 or f.rate == 5.0, (f.name, load)
        assert f.rate <= fleets.MAX_RATE
        assert f.seed not in range(1, 10)  # a generated fleet never replays an evaluation run's arrivals
    assert max(spreads) > 16 and max(spreads) <= 32 * 1.18 / 0.85 + 1e-6
    specs = [b for f in fl for b in f.backends]
    # per-class affinity: some backends are cheaper for heavy than for light requests
    assert any(b.costs[1] < b.costs[0] for b in specs)
    assert any(b.costs[1] > 2 * scn.HEAVY_COST for b in specs)
    assert any(p.slow >= 2 for b in specs for p in b.phases)
    assert any(p.fail > 0 for b in specs for p in b.phases)
    assert any(b.join_at > 0 for b in specs)
    assert any(b.weight > 1 for b in specs)
    assert any(f.bursts for f in fl)


def test_the_evaluation_set_keeps_the_six_and_adds_the_held_out_scenarios():
    assert set(scn.TUNED_ON) | set(NEW_SCENARIOS) == set(scn.SCENARIOS)
    s16, s64 = scn.get("spread16"), scn.get("spread64")
    for sc, n in ((s16, 16), (s64, 64)):
        med = [b.median_ms for b in sc.backends]
        assert len(med) == n and max(med) / min(med) == pytest.approx(16, rel=0.01)
        assert max(b.capacity for b in sc.backends) <= 2
        assert 0.6 < sc.rate / scn.capacity_rate(sc.backends, sc.heavy_share) < 0.8
    aff = scn.get("affinity").backends
    light = [b for b in aff if b.cost(0) < b.cost(1) / 2]
    heavy = [b for b in aff if b.cost(1) < b.cost(0)]
    assert len(light) == len(heavy) == 4
    # each kind is the fast one for one class
    assert min(b.cost(0) for b in light) < min(b.cost(0) for b in heavy)
    assert min(b.cost(1) for b in heavy) < min(b.cost(1) for b in light)
    assert len(scn.slowdowns(scn.get("drift"))) >= 10
    assert scn.get("twolb").instances == 2


# -- the simulator on the new scenarios ---------------------------------------------------------


@pytest.mark.parametrize("name", NEW_SCENARIOS)
def test_every_policy_runs_on_the_new_scenarios(name):
    sc = scn.get(name)
    for policy in sim.POLICIES:
        s = sim.Simulation(sc, policy, duration=2.0, seed=2)
        s.run()
        assert len(s.records) == len(s.arrivals) > 100, policy
        summary = s.summary()
        if policy not in ("round_robin", "weighted_round_robin", "random"):  # load-blind ones overflow
            assert summary.error_rate < 0.05, (policy, summary)
        assert len(summary.divert) == len(scn.slowdowns(sc))


def test_a_generated_fleet_runs_in_the_simulator():
    sc = fleets.generate(1003)
    s = sim.Simulation(sc, "p2c_ewma", duration=1.0)
    s.run()
    assert len(s.records) == len(s.arrivals) > 0


def test_two_instances_each_have_their_own_workers_and_engine():
    s = sim.Simulation(scn.get("twolb"), "ml", duration=2.0, workers=2)
    s.run()
    assert len(s.workers) == 4 and [w.instance for w in s.workers] == [0, 0, 1, 1]
    assert len(s.bridges) == 2 and s.bridges[0].engine is not s.bridges[1].engine
    assert [w.instance for w in s.bridges[1].workers] == [1, 1]
    # each instance routes by its own tables and sees only its own workers' traffic
    t0, t1 = (b.workers[0].strategy.table for b in s.bridges)
    assert t0 is not None and t1 is not None and t0.epoch != t1.epoch
    for b in s.bridges:
        sent = sum(w.requests for w in b.workers)
        assert 0.4 * len(s.arrivals) < sent < 0.6 * len(s.arrivals)
    one = sim.Simulation(scn.get("twolb"), "ml", duration=2.0, workers=2, instances=1)
    assert len(one.workers) == 2 and len(one.bridges) == 1


# -- ablations -----------------------------------------------------------------------------------


def test_ml_identity_routes_by_what_the_cells_showed():
    import numpy as np

    import sim_ml
    from inference.features import FEATURES

    m = sim_ml.IdentityModel()
    X = np.zeros((2, len(FEATURES)), np.float32)
    X[:, FEATURES.index("lat_ewma_log")] = np.log([0.004, 0.05])
    X[:, FEATURES.index("err_rate")] = [0.0, 0.9]
    lat, err = m.predict(X)
    assert lat == pytest.approx([0.004, 0.05], rel=1e-5) and err == pytest.approx([0.0, 0.9])
    s = sim.Simulation(scn.get("heterogeneous"), "ml-identity", duration=6.0)
    s.run()
    assert s.bridge.engine.model.version == "identity"
    summary = s.summary()
    assert summary.note.startswith("learned"), summary.note
    assert summary.share["big"] > summary.share["medium"] > summary.share["tiny"]


def test_least_latency_takes_the_least_ewma_times_load_of_all():
    from lb.core.config import Backend as BackendConfig
    from workers import backend

    bs = [backend.Backend(BackendConfig(address=f"127.0.0.1:{9000 + i}", name=f"x{i}"), 2, i)
          for i in range(6)]
    for b, ewma, inflight in zip(bs, (0.010, 0.002, 0.004, 0.001, 0.020, 0.003),
                                 (0, 3, 1, 9, 0, 0)):
        b.ewma, b.inflight = ewma, inflight
    st = sim_model.LeastLatency(bs, decay=10.0, rng=random.Random(1))
    # costs: 10, 8, 8, 10, 20, 3 (ms x (in-flight + 1)): x5 every time, whatever the start
    assert {st.pick((), 0).name for _ in range(12)} == {"x5"}
    assert st.pick([bs[5]], 0).name in {"x1", "x2"}
    bs[5].available = False
    picks = {st.pick((), 0).name for _ in range(12)}
    assert picks == {"x1", "x2"}  # ties are shared through the rotating start
    s = sim.Simulation(scn.get("slowdown"), "least-latency", duration=4.0)
    s.run()
    assert s.summary().share["b4"] < 0.2


# -- time to divert ------------------------------------------------------------------------------


def _records(rate: float, until: float, share_of_b: "callable"):
    """Evenly sent requests; request k goes to 'b' when share_of_b(t) says so
    (deterministic: a running sum decides, so the share is exact)."""
    out, acc = [], 0.0
    for k in range(int(until * rate)):
        t = k / rate
        acc += share_of_b(t)
        if acc >= 1.0:
            acc -= 1.0
            out.append((t, 0.005, 200, "b"))
        else:
            out.append((t, 0.005, 200, "a"))
    return out


def test_time_to_divert_on_a_synthetic_record_list():
    # b has 40% before t=5, then 4% from t=5.3 on: it diverts at 5.3
    recs = _records(1000, 10, lambda t: 0.4 if t < 5.3 else 0.04)
    assert report.time_to_divert(recs, "b", 5.0, 8.0) == pytest.approx(0.3, abs=0.01)
    # never diverted before the end of the slowdown
    assert report.time_to_divert(recs, "b", 5.0, 5.2) is None
    # ... nor for long enough before it
    assert report.time_to_divert(recs, "b", 5.0, 5.45) is None
    assert report.time_to_divert(recs, "b", 5.0, 5.6) == pytest.approx(0.3, abs=0.01)
    # no share to lose: nothing to measure
    assert report.time_to_divert(_records(1000, 10, lambda t: 0.0), "b", 5.0, 8.0) is None
    # ... nor with a few requests (4 in the second before): a policy already keeping away
    few = _records(1000, 10, lambda t: 0.004 if t < 5.0 else 0.0)
    assert report.time_to_divert(few, "b", 5.0, 8.0) is None
    assert report.time_to_divert(few, "b", 5.0, 8.0, least=3) == pytest.approx(0.0, abs=0.005)
    assert not report.had_share(few, "b", 5.0) and report.had_share(recs, "b", 5.0)
    # a share that falls steadily from 40% to 0 over 0.4 s diverts when it crosses half
    ramp = _records(1000, 10, lambda t: 0.4 if t < 5.0 else max(0.0, 0.4 * (1 - (t - 5.0) / 0.4)))
    assert report.time_to_divert(ramp, "b", 5.0, 8.0) == pytest.approx(0.2, abs=0.01)


def test_time_to_divert_does_not_read_the_moments_before_the_slowdown():
    # a policy that sends nothing more at once reads (about) 0 ...
    instant = _records(1000, 10, lambda t: 0.5 if t < 5.0 else 0.0)
    assert report.time_to_divert(instant, "b", 5.0, 8.0) == pytest.approx(0.0, abs=0.005)
    # ... however its share was spread over the second before: here all of it
    # in the last quarter second (a 0.25 s window sliding from before the start
    # read 0.22 s for this and 0.125 s for the even one)
    bunched = _records(1000, 10, lambda t: 1.0 if 4.75 <= t < 5.0 else 0.0)
    assert report.time_to_divert(bunched, "b", 5.0, 8.0) == pytest.approx(0.0, abs=0.005)
    # and a policy that keeps the share for 0.1 s reads 0.1 s (the window: 0.23 s)
    late = _records(1000, 10, lambda t: 0.5 if t < 5.1 else 0.0)
    assert report.time_to_divert(late, "b", 5.0, 8.0) == pytest.approx(0.1, abs=0.005)


def test_divert_times_follow_the_scenarios_slowdowns():
    assert scn.slowdowns(scn.get("slowdown")) == [("b4", 0.3, 0.6)]
    # (b4 slows down from 3 s of a 10 s run) a backend with no share to lose is left out
    def as_b4(share):
        return [(t, lat, st, "b4" if n == "b" else "b1") for t, lat, st, n in _records(1000, 10, share)]
    assert scn.divert_times(scn.get("slowdown"), as_b4(lambda t: 0.004), 10.0) == []
    (t0,) = scn.divert_times(scn.get("slowdown"), as_b4(lambda t: 0.25 if t < 3.05 else 0.0), 10.0)
    assert t0 == pytest.approx(0.05, abs=0.005)
    assert scn.slowdowns(scn.get("identical")) == []
    assert scn.slowdowns(scn.get("coldjoin")) == []  # a join is not a slowdown of a serving backend
    s = sim.Simulation(scn.get("slowdown"), "p2c_ewma", duration=10.0)
    s.run()
    (t,) = s.summary().divert
    assert t is not None and 0.0 <= t < 0.5
    rr = sim.Simulation(scn.get("slowdown"), "round_robin", duration=10.0)
    rr.run()
    assert rr.summary().divert == [None]  # round robin never turns away
    assert report.divert_cell([0.2]) == "200ms" and report.divert_cell([None]) == "never"
    assert report.divert_cell([0.2, 0.4, None]) == "median 200ms, max 400ms, 1 of 3 never"
    assert math.isfinite(t)


# -- training traces from the generator only ---------------------------------------------------


def test_training_traces_come_from_training_fleets_only(tmp_path):
    import subprocess

    out = tmp_path / "t.npz"
    p = subprocess.run([sys.executable, "scripts/make-training-traces", "--fleets", "2", "--first", "1001",
                        "--seconds", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "fleet1001" in p.stdout and "fleet1002" in p.stdout
    data = traces.read([str(out)])
    assert len(data["latency"]) > 50
    # one fleet after the other in time (lb train keeps the most recent records)
    fleet = np.array([b.split("/")[0] for b in data["backend"]])
    assert set(fleet) == {"fleet0", "fleet1"}
    assert (data["ts"][fleet == "fleet0"].max() < data["ts"][fleet == "fleet1"].min())
    for first in ("1", "99", "1999"):  # an evaluation seed, or past the training range
        p = subprocess.run([sys.executable, "scripts/make-training-traces", "--fleets", "2", "--first", first,
                            "--out", str(tmp_path / "x.npz")], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2 and "training seeds must lie in 1000-1999" in p.stderr
    assert not (tmp_path / "x.npz").exists()


# -- the real benchmark's two-instance split and busy host ---------------------------------------


def test_quality_splits_the_arrivals_between_instances_and_busy_loops_end_by_themselves(tmp_path):
    import time

    import quality

    sched = scn.run_schedule(scn.get("twolb"), 3.0, None, 1)
    parts = quality.split_schedule(sched, 2, 1)
    assert parts == quality.split_schedule(sched, 2, 1)
    assert sorted(parts[0] + parts[1]) == sched
    assert 0.4 < len(parts[0]) / len(sched) < 0.6
    assert quality.split_schedule(sched, 1, 1) == [sched]
    procs = quality.start_busy(str(tmp_path), 1.0)
    try:
        assert len(procs) == (__import__("os").cpu_count() or 1)
        deadline = time.monotonic() + 30
        while any(p.alive() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(p.alive() for p in procs)  # bounded even if nobody stops them
    finally:
        for p in procs:
            p.stop(grace=1.0)


def test_the_overview_compares_ml_with_the_best_policy_that_fails_no_more():
    def row(policy, p99, err):
        return {"policy": policy, "p99_s": p99, "p999_s": 2 * p99, "error_rate": err}

    res = {"a": {"rows": [row("p2c_ewma", 0.040, 0.0), row("least_connections", 0.030, 0.4),
                          row("ml", 0.036, 0.0)]},
           "b": {"rows": [row("p2c_ewma", 0.040, 0.3), row("least_connections", 0.030, 0.4),
                          row("ml", 0.050, 0.02)]}}
    text = sim.overview(res, ["p2c_ewma", "least_connections", "ml"])
    a, b = (line for line in text.splitlines() if line.startswith(("a ", "b ")))
    assert a.split()[-1] == "0.90x"  # 36 / 40: least_connections' 30 ms came with 40% errors
    assert b.endswith("fewest errors")
    assert "30.0 / 60 40.0%" in a


def test_quality_reports_the_spread_of_repeated_runs_not_the_best():
    import quality

    rows = [report.Summary(f"ml{b} #{k}", 100, 0.005, p99, 2 * p99, err)
            for b in ("", " busy") for k, (p99, err) in enumerate(((0.076, 0.0), (0.235, 0.01), (0.1, 0.0)), 1)]
    text = quality.spread(rows)
    assert "ml: 3 runs, p99 100ms (76.0ms-235ms), p99.9 200ms (152ms-470ms), errors 0.00% (0.00%-1.00%)" in text
    assert "ml busy: 3 runs" in text


def test_compare_models_passes_a_model_against_itself_and_judges_by_routing():
    import inference.engine  # noqa: F401  (lb's own package: a broken import must fail, not skip)
    import importlib.machinery
    import importlib.util
    import subprocess

    loader = importlib.machinery.SourceFileLoader("compare_models", str(ROOT / "scripts" / "compare-models"))
    spec = importlib.util.spec_from_loader("compare_models", loader)
    cm = importlib.util.module_from_spec(spec)
    loader.exec_module(cm)
    assert cm.verdict((0.040, 0.060, 0.0), (0.041, 0.062, 0.0005), 0.05) == ""
    assert cm.verdict((0.040, 0.060, 0.0), (0.043, 0.060, 0.0), 0.05) == "p99"
    assert cm.verdict((0.040, 0.060, 0.01), (0.030, 0.070, 0.02), 0.05) == "p99.9, errors"
    from inference.model import DEFAULT_MODEL

    p = subprocess.run([sys.executable, "scripts/compare-models", DEFAULT_MODEL, "--scenarios", "affinity",
                        "--duration", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "affinity (held out)" in p.stdout and p.stdout.rstrip().endswith("candidate is not worse")


def test_capacity_fleets_are_static_and_known():
    """bench/capacity_bench.py's fleets: no phases, one class, and the load it
    estimates at is the stated share of their saturation."""
    import capacity_bench  # noqa: E402

    for seed in (1, 2, 1001):
        sc = scn.get(f"steady{seed}")
        assert sc is not None and 2 <= len(sc.backends) <= 3
        assert all(not b.phases and b.join_at == 0 and b.capacity in (1, 2, 4) for b in sc.backends)
        assert sc.heavy_share == 0.0
        sat = sum(capacity_bench.saturation(b) for b in sc.backends)
        assert math.isclose(sc.rate, sat * capacity_bench.LOAD)
    assert scn.get("steady7").backends == scn.get("steady7").backends  # same seed, same fleet


def test_capacity_bench_counts_the_requests_that_found_every_slot_taken():
    """The benchmark's floor: a request counts when, as the client saw them,
    `slots` others to the same backend were still in flight at its send."""
    import capacity_bench  # noqa: E402

    records = [(0.00, 0.05, 200, "a"), (0.01, 0.05, 200, "a"), (0.02, 0.05, 200, "a"),
               (0.10, 0.01, 200, "a"), (0.00, 1.00, 200, "b"), (0.03, 0.01, 0, "a")]
    assert [capacity_bench.full_sends(records, "a", k) for k in (1, 2, 3)] == [2, 1, 0]
    assert capacity_bench.full_sends(records, "b", 1) == 0
