"""Load forecast: the next minutes of request rate from the per-minute history.

I/O-free (a list of per-minute rates in, forecast points out), driven the same
way by the admin process and by bench/forecast_bench.py.  The models are
statsmodels' (exponential smoothing, STL decomposition), not hand-written:

* with at least SEASONAL_DAYS days of history, the rates are averaged into
  BUCKET-minute buckets and forecast by STL (the daily profile, period
  1440 / BUCKET buckets) around an exponential-smoothing model of what is left
  (damped additive trend); the forecast's minutes are interpolated between
  buckets;
* with less, a damped additive trend model on the last TREND_WINDOW minutes.

Each point has a prediction interval (LEVEL, from the model's own error
variance), and nothing is below zero.  Weekly seasonality is not modelled yet.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

HORIZONS = (5, 15, 30, 60)  # minutes ahead
LEVEL = 0.95
MIN_MINUTES = 30  # below this, no forecast
SEASONAL_DAYS = 2
BUCKET = 15  # minutes per bucket for the seasonal model
TREND_WINDOW = 720  # minutes the trend model looks back


@dataclass
class Point:
    minutes: int
    rps: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"minutes": self.minutes, "rps": round(self.rps, 3), "low": round(self.low, 3),
                "high": round(self.high, 3)}


@dataclass
class Forecast:
    method: str  # "seasonal_daily", "trend", or "none"
    points: list[Point]
    history_minutes: int
    reason: str = ""


def forecast(per_minute: list[float] | np.ndarray, horizons=HORIZONS) -> Forecast:
    y = np.asarray(per_minute, dtype=np.float64)
    n = len(y)
    if n < MIN_MINUTES:
        return Forecast("none", [], n, f"{n} minutes of history, {MIN_MINUTES} needed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter of the optimiser
        if n >= SEASONAL_DAYS * 1440:
            return Forecast("seasonal_daily", _seasonal(y, horizons), n)
        return Forecast("trend", _trend(y[-TREND_WINDOW:], horizons), n)


def _trend(y: np.ndarray, horizons) -> list[Point]:
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    if np.ptp(y) == 0:  # a constant series: nothing to fit
        return [Point(h, float(y[-1]), float(y[-1]), float(y[-1])) for h in horizons]
    fit = ETSModel(_series(y), error="add", trend="add", damped_trend=True).fit(disp=False)
    frame = fit.get_prediction(start=len(y), end=len(y) + max(horizons) - 1).summary_frame(alpha=1 - LEVEL)
    mean, lo, hi = _columns(frame)
    return [_point(h, mean[h - 1], lo[h - 1], hi[h - 1]) for h in horizons]


def _seasonal(y: np.ndarray, horizons) -> list[Point]:
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel
    from statsmodels.tsa.forecasting.stl import STLForecast

    usable = len(y) - len(y) % BUCKET
    buckets = y[len(y) - usable:].reshape(-1, BUCKET).mean(axis=1)
    steps = -(-max(horizons) // BUCKET) + 1
    model = STLForecast(_series(buckets), ETSModel, period=1440 // BUCKET, robust=True,
                        model_kwargs={"error": "add", "trend": "add", "damped_trend": True})
    res = model.fit(fit_kwargs={"disp": False})
    frame = res.get_prediction(start=len(buckets), end=len(buckets) + steps - 1).summary_frame(alpha=1 - LEVEL)
    mean, lo, hi = _columns(frame)
    # bucket i of the forecast is centred BUCKET * (i + 0.5) minutes after the end
    # of the last full bucket; the history's last minutes are part of no bucket
    offset = len(y) % BUCKET
    centres = BUCKET * (np.arange(steps) + 0.5) - offset
    # A minute varies around its bucket's mean too: widen the buckets' interval
    # by that spread (the two are independent, so their variances add).
    z = 1.959964  # LEVEL = 0.95
    minute_sd = float(np.std(y[len(y) - usable:].reshape(-1, BUCKET) - buckets[:, None]))
    out = []
    for h in horizons:
        m = float(np.interp(h, centres, mean))
        lo_b, hi_b = float(np.interp(h, centres, lo)), float(np.interp(h, centres, hi))
        lo_w = np.hypot(m - lo_b, z * minute_sd)
        hi_w = np.hypot(hi_b - m, z * minute_sd)
        out.append(_point(h, m, m - lo_w, m + hi_w))
    return out


def _columns(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and interval of a statsmodels prediction frame (ETS names them pi_*,
    STLForecast mean_ci_*)."""
    lo, hi = ("pi_lower", "pi_upper") if "pi_lower" in frame else ("mean_ci_lower", "mean_ci_upper")
    return frame["mean"].to_numpy(), frame[lo].to_numpy(), frame[hi].to_numpy()


def _series(y: np.ndarray):
    import pandas as pd  # (statsmodels' prediction frames need an index)

    return pd.Series(y, index=pd.RangeIndex(len(y)))


def _point(h: int, mean: float, lo: float, hi: float) -> Point:
    mean = max(0.0, float(mean))
    return Point(h, mean, max(0.0, min(float(lo), mean)), max(float(hi), mean))


def mape(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Mean absolute percentage error (minutes with no traffic are left out)."""
    actual, predicted = np.asarray(actual, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    keep = actual > 0
    return float(np.mean(np.abs(predicted[keep] - actual[keep]) / actual[keep])) if keep.any() else 0.0
