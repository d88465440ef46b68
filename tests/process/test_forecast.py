"""The load forecast (lb/forecast.py), its per-minute history
(lb/admin/loadhistory.py), and GET /api/capacity on a running lb."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from lb.admin.loadhistory import MAX_GAP, LoadHistory
from lb.forecast import HORIZONS, MIN_MINUTES, forecast, mape
from tests.rawhttp import get

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "bench"))
from forecast_bench import trace  # noqa: E402  (bench/forecast_bench.py: the synthetic trace)


def _against_naive(y, origins, window=None):
    pred, naive, actual, inside, n = [], [], [], 0, 0
    for o in origins:
        hist = y[:o] if window is None else y[o - window:o]
        f = forecast(hist)
        for p in f.points:
            a = y[o + p.minutes - 1]
            pred.append(p.rps)
            naive.append(hist[-1])
            actual.append(a)
            inside += p.low <= a <= p.high
            n += 1
            assert 0 <= p.low <= p.rps <= p.high
    return mape(actual, pred), mape(actual, naive), inside / n, f.method


def test_seasonal_forecast_beats_the_naive_one():
    y = trace(seed=23, days=4)  # (the benchmark reports seed 7)
    ours, naive, coverage, method = _against_naive(y, range(3 * 1440, 4 * 1440 - 61, 181))
    assert method == "seasonal_daily"
    assert ours < naive, (ours, naive)
    assert coverage >= 0.75, coverage


def test_trend_forecast_on_short_history_beats_the_naive_one():
    y = trace(seed=29, days=2)
    ours, naive, coverage, method = _against_naive(y, range(720, 2 * 1440 - 61, 97), window=720)
    assert method == "trend"
    assert ours < naive, (ours, naive)
    assert coverage >= 0.75, coverage


def test_forecast_needs_some_history_and_copes_with_flat_load():
    f = forecast([5.0] * (MIN_MINUTES - 1))
    assert f.method == "none" and f.points == [] and "minutes" in f.reason
    f = forecast([0.0] * 100)
    assert [p.rps for p in f.points] == [0.0] * len(HORIZONS)


def test_history_counts_minutes_fills_short_gaps_and_restarts_after_long_ones():
    h = LoadHistory(None)
    t0 = 1_000_000 * 60.0
    h.observe(t0 + 5, 0)  # the first reading starts the count
    h.observe(t0 + 61, 600)  # minute t0 ended: (600 - 0) / 60
    h.observe(t0 + 121, 1800)
    assert h.rates == [10.0, 20.0]
    h.append(int(t0 // 60) + 4, 50.0)  # two minutes missing: filled between 20 and 50
    assert h.rates == [10.0, 20.0, 30.0, 40.0, 50.0]
    h.append(int(t0 // 60) + 5 + MAX_GAP + 1, 7.0)  # lb was away too long: a new series
    assert h.rates == [7.0]


def test_capacity_estimate_is_a_k_server_queue():
    """Erlang C and the objective: more slots, more capacity, never above
    saturation; a service slower than the objective has none."""
    from lb.capacity import erlang_c, estimate

    assert abs(erlang_c(2, 1.0) - 1 / 3) < 1e-9 and abs(erlang_c(4, 2.0) - 4 / 23) < 1e-9
    caps = [estimate(k, 0.02, 2.0, 0.25, True) for k in (1, 2, 4, 8)]
    assert all(0 < c.capacity_rps < c.saturation_rps for c in caps)
    assert [c.capacity_rps for c in caps] == sorted(c.capacity_rps for c in caps)
    assert estimate(4, 0.2, 2.0, 0.25, False).capacity_rps == 0.0
    assert "at least" in estimate(4, 0.02, 2.0, 0.25, False).note


def test_history_file_survives_and_a_corrupt_one_is_replaced(tmp_path, monkeypatch):
    from lb.admin import loadhistory

    said = []
    monkeypatch.setattr(loadhistory.log, "log", lambda event, **kw: said.append(event))
    h = LoadHistory(str(tmp_path))
    for i in range(5):
        h.append(100 + i, float(i))
    h.save()
    again = LoadHistory(str(tmp_path))
    again.load()
    assert again.rates == [0.0, 1.0, 2.0, 3.0, 4.0] and again.start == 100
    (tmp_path / "load-history.json").write_text("{not json")
    broken = LoadHistory(str(tmp_path))
    broken.load()
    assert broken.rates == []
    assert said[-1] == "load_history_replaced"
    assert json.loads((tmp_path / "load-history.json").read_text())["rates"] == []


def test_capacity_api_and_gauges_on_a_running_lb(tmp_path, lb_factory, backend_factory):
    """A history written before lb starts (runtime_dir) is forecast at once;
    the current load follows the traffic."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    y = trace(seed=31, days=3)
    import time

    now_minute = int(time.time() // 60)
    (runtime / "load-history.json").write_text(json.dumps(
        {"version": 1, "start": now_minute - len(y), "rates": [round(float(v), 3) for v in y]}))
    b = backend_factory("b1")
    lb = lb_factory([b], extra=f'runtime_dir = "{runtime}"')
    from tests.supervision import wait_until

    def view():
        return json.loads(get(lb.admin_port, "/api/capacity")[2])

    v = wait_until(lambda: (v := view())["forecast"] and v, 30, 0.2)
    # the history grows by one minute at each minute the clock turns after it was written
    turned = int(time.time() // 60) - now_minute
    assert v["forecast_method"] == "seasonal_daily"
    assert len(y) <= v["history_minutes"] <= len(y) + turned, (v["history_minutes"], len(y), turned)
    assert [p["minutes"] for p in v["forecast"]] == list(HORIZONS)
    assert all(0 <= p["low"] <= p["rps"] <= p["high"] for p in v["forecast"])
    for _ in range(50):
        assert get(lb.port, "/")[0] == 200
    assert wait_until(lambda: view()["fleet"]["load_rps"] > 0, 10, 0.2)
    metrics = get(lb.admin_port, "/metrics")[2].decode()
    assert 'lb_fleet_load_forecast_rps{minutes="60"}' in metrics and "lb_fleet_load_rps " in metrics
    # `lb capacity` asks the running instance and prints the same view.
    import subprocess

    from tests.conftest import ROOT

    r = subprocess.run([sys.executable, "-m", "lb", "capacity", "-c", str(lb.config)], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "req/s" in r.stdout and "forecast (seasonal_daily" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "lb", "capacity", "-c", str(lb.config), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert json.loads(r.stdout)["history_minutes"] >= len(y)
