"""The open-loop load generator (bench/loadgen.py) against the simulated
scenario backends (bench/scenario_backend.py), both as real processes and
sockets on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import loadgen  # noqa: E402
import scenarios as scn  # noqa: E402


def even(rate: float, duration: float, cls: int = 0) -> list[tuple[float, int]]:
    return [(i / rate, cls) for i in range(int(rate * duration))]


def test_open_loop_latency_counts_from_the_schedule(scenario_backends):
    # "tiny" serves 2 at a time for ~20 ms: ~100 req/s.  Sent 200 req/s, its
    # queue grows all along, and so must the measured latency.
    ports, _ = scenario_backends("heterogeneous", 10)
    sched = even(200, 1.5)
    t0 = time.monotonic()
    records, gen = loadgen.run_load(ports[3], sched, timeout=5.0)
    assert time.monotonic() - t0 < 8
    assert len(records) == len(sched)
    assert [r[0] for r in sorted(records)] == [t for t, _ in sched]
    assert all(r[2] == 200 and r[3] == "tiny" for r in records)
    first = sorted(r[1] for r in records if r[0] < 0.1)
    last = sorted(r[1] for r in records if r[0] > 1.2)
    assert first[len(first) // 2] < 0.1
    assert last[len(last) // 2] > 0.5  # ~0.75 s of backlog by then
    assert gen.max_open > 20  # a busy connection is never waited for: more were opened


def test_timeout_is_an_error_at_the_timeout(scenario_backends):
    ports, _ = scenario_backends("heterogeneous", 10)
    records, _ = loadgen.run_load(ports[3], even(300, 1.0), timeout=0.3)
    timed_out = [r for r in records if r[2] == 0]
    assert len(records) == 300
    assert len(timed_out) > 100
    assert all(r[1] == 0.3 and r[3] == "-" for r in timed_out)
    assert all(r[1] <= 0.3 for r in records)


def test_fast_failing_backend_answers_503_at_once(scenario_backends):
    ports, proc = scenario_backends("fastfail", 10)
    records, _ = loadgen.run_load(ports[3], even(300, 1.0),
                                  on_start=lambda: os.kill(proc.pid, signal.SIGUSR1))
    fails = sorted(r[1] for r in records if r[2] == 503)
    assert 0.8 < len(fails) / len(records) < 0.97  # fails with p = 0.9
    assert fails[len(fails) // 2] < 0.003
    assert {r[3] for r in records} == {"b4"}


def test_heavy_requests_cost_more_and_phases_follow_the_clock(scenario_backends):
    ports, proc = scenario_backends("slowdown", 2.0)  # b4: 10x slower from 0.6 s to 1.2 s
    sched = [(i / 100, 1 if i % 5 == 0 else 0) for i in range(200)]
    records, _ = loadgen.run_load(ports[3], sched,
                                  on_start=lambda: os.kill(proc.pid, signal.SIGUSR1))
    by = {t: r for t, r in zip((t for t, _ in sched), sorted(records))}

    def median(sel):
        v = sorted(by[t][1] for t, c in sched if sel(t, c))
        return v[len(v) // 2]

    light = median(lambda t, c: c == 0 and (t < 0.5 or t > 1.4))
    heavy = median(lambda t, c: c == 1 and (t < 0.5 or t > 1.4))
    slowed = median(lambda t, c: c == 0 and 0.7 < t < 1.1)
    assert 0.003 < light < 0.009
    assert 3 * light < heavy < 8 * light
    assert slowed > 5 * light


def test_late_joiner_refuses_then_serves(scenario_backends):
    ports, proc = scenario_backends("coldjoin", 2.0)  # b4 listens from 0.8 s on
    records, _ = loadgen.run_load(ports[3], even(100, 1.6),
                                  on_start=lambda: os.kill(proc.pid, signal.SIGUSR1))
    early = [r for r in records if r[0] < 0.7]
    late = [r for r in records if r[0] > 1.0]
    assert early and all(r[2] == 0 for r in early)  # connection refused: an error
    assert late and all(r[2] == 200 and r[3] == "b4" for r in late)


def test_bad_usage_is_one_clear_line():
    for argv in (["bench/scenario_backend.py", "--scenario", "nope", "--ports", "1",
                  "--duration", "1"],
                 ["bench/scenario_backend.py", "--scenario", "identical", "--ports", "1,2",
                  "--duration", "1"],
                 ["bench/quality.py", "--scenario", "nope"],
                 ["bench/quality.py", "--policies", "nginx,fastest"]):
        p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 2, (argv, p.stderr)
        assert "Traceback" not in p.stderr and "error:" in p.stderr
