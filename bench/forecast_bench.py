"""Forecast accuracy of lb/forecast.py on synthetic per-minute request rates.

The trace: SIM_DAYS days of one request rate per minute with a daily cycle
(the rate swings by AMPLITUDE around BASE), a slow trend and noise (Gaussian,
NOISE of the rate, plus rare bursts).  Time is compressed: the trace is an
array, the forecast is fitted at each origin on everything before it, exactly
as the admin process fits it on its history.  At every origin (one every
STRIDE minutes over the last EVAL_DAYS days) each horizon's forecast is
compared with the trace, and with the naive forecast (the last minute's rate)
and the seasonal naive one (the same minute a day earlier).  Printed per
horizon: MAPE of each, and how often the trace fell inside the forecast's 95%
interval.  With --short, the same with less than SEASONAL_DAYS of history
(the trend model).

Usage: python bench/forecast_bench.py [--seed 7] [--stride 97] [--short]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lb.forecast import HORIZONS, forecast, mape  # noqa: E402

SIM_DAYS = 6
EVAL_DAYS = 2
BASE, AMPLITUDE, NOISE = 300.0, 0.5, 0.05


def trace(seed: int, days: int = SIM_DAYS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(days * 1440, dtype=np.float64)
    daily = 1 + AMPLITUDE * np.sin(2 * np.pi * (t / 1440 - 0.3)) + 0.15 * np.sin(4 * np.pi * t / 1440)
    trend = 1 + 0.02 * t / 1440
    rate = BASE * daily * trend
    rate *= 1 + rng.normal(0, NOISE, len(t))
    bursts = rng.random(len(t)) < 0.002
    rate[bursts] *= 1.5
    return np.maximum(rate, 0.0)


def evaluate(y: np.ndarray, origins, window: int | None = None) -> dict:
    pred = {h: [] for h in HORIZONS}
    naive = {h: [] for h in HORIZONS}
    snaive = {h: [] for h in HORIZONS}
    actual = {h: [] for h in HORIZONS}
    inside = {h: 0 for h in HORIZONS}
    methods = set()
    t0 = time.perf_counter()
    for o in origins:
        hist = y[:o] if window is None else y[o - window:o]
        f = forecast(hist)
        methods.add(f.method)
        for p in f.points:
            a = y[o + p.minutes - 1]
            pred[p.minutes].append(p.rps)
            actual[p.minutes].append(a)
            naive[p.minutes].append(hist[-1])
            snaive[p.minutes].append(y[o + p.minutes - 1 - 1440])
            inside[p.minutes] += p.low <= a <= p.high
    fit_s = (time.perf_counter() - t0) / max(1, len(origins))
    rows = {}
    for h in HORIZONS:
        rows[h] = {"mape": mape(actual[h], pred[h]), "naive": mape(actual[h], naive[h]),
                   "seasonal_naive": mape(actual[h], snaive[h]),
                   "coverage": inside[h] / max(1, len(actual[h]))}
    return {"rows": rows, "methods": sorted(methods), "origins": len(origins), "fit_seconds": fit_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--stride", type=int, default=97, help="minutes between two forecast origins")
    ap.add_argument("--short", action="store_true", help="12 hours of history: the trend model")
    args = ap.parse_args(argv)
    y = trace(args.seed)
    start = (SIM_DAYS - EVAL_DAYS) * 1440
    origins = list(range(start, len(y) - max(HORIZONS), args.stride))
    res = evaluate(y, origins, window=720 if args.short else None)
    print(f"trace: {SIM_DAYS} days per minute, daily cycle +-{AMPLITUDE:.0%} around {BASE:.0f} req/s, "
          f"noise {NOISE:.0%}, seed {args.seed}; {res['origins']} origins over the last {EVAL_DAYS} days; "
          f"model {', '.join(res['methods'])}; {res['fit_seconds'] * 1000:.0f} ms per fit")
    print(f"{'minutes':>8} {'MAPE':>8} {'naive':>8} {'seasonal naive':>15} {'95% interval covers':>20}")
    for h, r in res["rows"].items():
        print(f"{h:>8} {r['mape']:>8.1%} {r['naive']:>8.1%} {r['seasonal_naive']:>15.1%} {r['coverage']:>20.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
