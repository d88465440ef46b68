"""From predictions to weights, and the model's online prediction error.

Weights (per class, over live backends):

    score  = (1 - error) ** ERROR_POWER / latency ** LATENCY_POWER
    weight = (1 - exploration) * score / sum(score) + exploration / n_live

* Errors weigh heavily: with ERROR_POWER = 8 a backend predicted to fail 80%
  of its requests keeps ~3e-6 of its score, however fast it answers (a fast
  503 looks "fast": latency alone would pull traffic onto it).  5% errors
  cost a third of the score.
* Latency is soft (LATENCY_POWER = 2): a backend predicted twice as slow gets
  a quarter of the share, not nothing.  The predictions already include the
  backend's current load (in-flight, rate are features), so a favourite that
  starts to queue is predicted slower on the next tick and loses share: the
  weights settle where predicted latencies even out instead of herding.
* Every live backend keeps `exploration / n_live` (nothing starves, every
  backend keeps producing fresh data for the features and for training).

Workers pick with two weighted draws and keep the higher weight / (local
in-flight + 1).  With equal in-flight counts that squares small weights (a
backend with weight w wins about w^2 of the picks when every other weight is
higher); the in-flight term gives them their chances back whenever the
favourites are busy.  The weights are deliberately NOT pre-compensated for the
squaring: a backend that fails fast never has requests in flight, so a larger
floor weight would make it win every comparison against a busy healthy
backend (measured: 7-18% of the traffic to an 80%-failing backend instead of
2-3%).
"""

from __future__ import annotations

import math

import numpy as np

from inference.features import BUCKET_LOG_MID

ERROR_POWER = 8.0
LATENCY_POWER = 2.0
CONFIDENCE_TAU = 5.0  # seconds: smoothing of the online prediction error
CONFIDENCE_MIN_COUNT = 50.0  # responses (decayed) before the error is judged
RECOVER_RATIO = 0.8  # leave low_confidence below this share of the threshold


def weights(latency: np.ndarray, error: np.ndarray, live: np.ndarray, exploration: float) -> np.ndarray:
    """latency, error: (C, B) predictions; live: (B,) bool.  Returns (C, B) rows summing to 1."""
    C, B = latency.shape
    n_live = int(live.sum())
    if n_live == 0:
        return np.full((C, B), 1.0 / max(B, 1))
    lat = np.maximum(latency, 1e-5)
    ok = np.clip(1.0 - error, 0.0, 1.0)
    # work in logs: scores span many orders of magnitude
    log_score = ERROR_POWER * np.log(np.maximum(ok, 1e-12)) - LATENCY_POWER * np.log(lat)
    log_score = np.where(live[None, :], log_score, -np.inf)
    log_score -= log_score.max(axis=1, keepdims=True)
    score = np.exp(log_score)
    score /= score.sum(axis=1, keepdims=True)
    w = (1.0 - exploration) * score + np.where(live, exploration / n_live, 0.0)[None, :]
    return w / w.sum(axis=1, keepdims=True)


def static_weights(weights_cfg: np.ndarray, live: np.ndarray, n_classes: int) -> np.ndarray:
    """Fallback tables: configured weights over live backends."""
    B = len(weights_cfg)
    w = np.where(live, np.maximum(weights_cfg, 0.0), 0.0)
    if w.sum() <= 0:
        w = live.astype(np.float64) if live.any() else np.ones(B)
    row = w / w.sum() if B else w
    return np.tile(row, (n_classes, 1))


class Confidence:
    """Mean |ln(observed / predicted)| of the latency, weighted by responses,
    smoothed over CONFIDENCE_TAU seconds.  The predictions made at one tick are
    compared with what was observed until the next tick, per (backend, class).

    "Observed" is the mean of ln(latency) over the responses (from the
    histogram, each bucket at its geometric middle), because the model
    predicts the mean of ln(latency): an arithmetic mean would count a backend
    whose answers mix 0.3 ms failures and 3 ms successes as mispredicted."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.num = 0.0
        self.den = 0.0
        self.pred: np.ndarray | None = None
        self.low = False

    def reset(self) -> None:
        self.num = self.den = 0.0
        self.pred = None
        self.low = False

    def observe(self, hist: np.ndarray, dt: float) -> None:
        """hist: (C, B, N_BUCKETS) latency histogram of the responses since the last tick."""
        keep = math.exp(-dt / CONFIDENCE_TAU)
        self.num *= keep
        self.den *= keep
        if self.pred is None or self.pred.shape != hist.shape[:2]:
            return
        resp = hist.sum(axis=2)
        has = resp > 0
        if not has.any():
            return
        obs_log = (hist[has] @ BUCKET_LOG_MID) / resp[has]
        ratio = np.abs(obs_log - np.log(np.maximum(self.pred[has], 1e-5)))
        self.num += float((ratio * resp[has]).sum())
        self.den += float(resp[has].sum())

    def value(self) -> float:
        """The current error, or -1 when too little was observed to judge."""
        return self.num / self.den if self.den >= CONFIDENCE_MIN_COUNT else -1.0

    def update_low(self) -> bool:
        v = self.value()
        if v < 0:
            return self.low
        if self.low:
            self.low = v > self.threshold * RECOVER_RATIO
        else:
            self.low = v > self.threshold
        return self.low
