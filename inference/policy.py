"""From predictions to prices and weights, and the model's online prediction error.

Per class, over live backends:

    shrink(p)    = w * observed error rate + (1 - w) * prior,
                   w = answers / (answers + PRIOR_ANSWERS)          (`shrink`)
    prior        = the same blend of the backend's rate for the other
                   classes and p
    priced error = t * shrink(predicted error) + (1 - t) * shrink(observed rate),
                   t = the model's weight for the backend, by how well its
                   predictions foretold the failures that followed (`ErrorRecord`)
    cost   = latency / (1 - priced error) ** (ERROR_POWER / LATENCY_POWER)
    weight = (1 - exploration) * score / sum(score) + exploration / n_live,
             score = (1 - priced error) ** ERROR_POWER / latency ** LATENCY_POWER

* Workers (`workers.learned.TableStrategy`) route by their own load curves
  and take from the table the priced error (read back from cost / latency)
  and the predicted latency of classes they have not seen answered.  The
  weights are published for the dashboard and `/api/route`.
* Errors weigh heavily: a fast 503 looks "fast", so its latency must not make
  it attractive: a backend priced at 60% errors costs ~1,500x its latency,
  1% costs 8% more.  The prediction is shrunk towards what the cell did, so
  a backend answering everything at hundreds of requests per second is priced
  by that, whatever the model says.
* `exploration` goes in the table too: the share of picks workers may send to
  a backend they have not heard from lately.
"""

from __future__ import annotations

import math

import numpy as np

from inference.features import BUCKET_LOG_HI, BUCKET_LOG_LO

ERROR_POWER = 16.0
LATENCY_POWER = 2.0
CONFIDENCE_TAU = 5.0  # seconds: smoothing of the online prediction error
CONFIDENCE_MIN_COUNT = 50.0  # responses (decayed) before the error is judged
RECOVER_RATIO = 0.8  # leave low_confidence below this share of the threshold
PRIOR_ANSWERS = 20.0  # the model's error prediction weighs as much as this many answers
# error predictions are judged as probabilities within [TRUST_EPS, 1 - TRUST_EPS]: one
# failure where none was expected costs ln(1 / TRUST_EPS), not infinitely much
TRUST_EPS = 1e-4


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


def shrink(predicted: np.ndarray, observed: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """The error probability the picks are priced with (all (C, B)): a cell's
    observed error rate over its recent `answers`, beside a prior worth
    PRIOR_ANSWERS answers; the prior is the backend's own record for the
    other classes, beside the model's prediction, again worth PRIOR_ANSWERS.  A
    cell with plenty of recent answers is priced by what it did; one with
    few, by what its backend did for the other classes; only a backend with
    few answers of any class by what the model expects.  So a model
    predicting errors for backends that answer everything cannot make them
    look dearer than they are, not even for a class the pick keeps away from
    them (which would then never bring the answers to correct it)."""
    errors = observed * answers
    others = answers.sum(axis=0)[None, :] - answers  # the backend's answers of the other classes
    rate = (errors.sum(axis=0)[None, :] - errors) / np.maximum(others, 1e-9)
    wb = others / (others + PRIOR_ANSWERS)
    prior = wb * rate + (1.0 - wb) * predicted
    w = answers / (answers + PRIOR_ANSWERS)
    return np.clip(w * observed + (1.0 - w) * prior, 0.0, 1.0)


class ErrorRecord:
    """Whose error prediction prices the picks: the model's, or the cells'
    own record, by how well each foretold the failures that followed.

    Every tick prices each cell's error twice, with `shrink`: once from the
    model's prediction (`model`), once from the cell's observed rate alone
    (`own`, what the `ml-identity` ablation prices).  At the next tick both are
    scored by the log-likelihood of what the cells did meanwhile (their
    attempts and errors, summed over cells), the difference decayed over
    CONFIDENCE_TAU seconds.  The error the picks are priced with is the mix
    of the two with the model's posterior weight (`trust`), equal odds to
    begin with: Bayesian model averaging between the two.  A backend's
    weight is judged by its own record and by the whole fleet's (its own
    included): on a cell with few answers (a class a backend is seldom sent)
    a model's error predictions are judged by how they fared everywhere.
    Judged per backend alone, the shipped model's predictions of a few per
    cent of errors on seldom-answered cells of healthy fleets kept about
    half their weight, and a 2.5 ms backend was priced at 12 ms (evaluation
    fleets 52 and 53: p99 1.6-1.8x the ablations', docs/learning.md).  A
    model whose small error predictions keep meeting backends that fail
    nothing loses its weight within a few hundred answers; one that
    foretells failures the record has not shown yet (a backend that starts
    failing) earns it, there and, a little, on the rest of the fleet."""

    def __init__(self, earned: bool = True) -> None:
        self.earned = earned  # False (`learning.model_errors = "always"`): the model's weight stays 1
        self.reset()

    def reset(self) -> None:
        # per backend: log-likelihood of `own` minus `model`'s, decayed
        self.margin: np.ndarray | float = 0.0
        self.pred: tuple[np.ndarray, np.ndarray] | None = None

    def observe(self, attempts: np.ndarray, errors: np.ndarray, dt: float) -> None:
        """(C, B) attempts and errors since the last tick."""
        keep = math.exp(-dt / CONFIDENCE_TAU)
        self.margin = self.margin * keep
        if self.pred is None or self.pred[0].shape != attempts.shape:
            return
        a = attempts
        e = np.minimum(errors, a)

        def loglik(p: np.ndarray) -> np.ndarray:  # per backend
            p = np.clip(p, TRUST_EPS, 1.0 - TRUST_EPS)
            return (e * np.log(p) + (a - e) * np.log1p(-p)).sum(axis=0)

        self.margin = self.margin + loglik(self.pred[1]) - loglik(self.pred[0])

    def trust(self) -> np.ndarray | float:
        """The model's posterior weight per backend, 0..1: from the backend's
        record plus the fleet's."""
        m = self.margin
        return 1.0 / (1.0 + np.exp(np.clip(m + np.sum(m), -50.0, 50.0)))

    def price(self, predicted: np.ndarray, observed: np.ndarray, answers: np.ndarray) -> np.ndarray:
        """The priced error (C, B) of this tick, remembered to be judged at the next."""
        model = shrink(predicted, observed, answers)
        if not self.earned:
            return model  # (nothing remembered: no record to keep)
        own = shrink(observed, observed, answers)
        self.pred = (model, own)
        if np.shape(self.margin) not in ((), own.shape[1:]):
            self.margin = 0.0  # another fleet: a new record
        t = self.trust()
        return t * model + (1.0 - t) * own


def costs(latency: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Expected cost per (class, backend) for the workers' pick: score ** (-1 /
    LATENCY_POWER) = latency x (1 - error) ** (-ERROR_POWER / LATENCY_POWER),
    the same preference as the weights, in seconds."""
    lat = np.maximum(latency, 1e-5)
    ok = np.clip(1.0 - error, 1e-6, 1.0)
    return lat * ok ** (-ERROR_POWER / LATENCY_POWER)


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

    "Observed" is the mean of ln(latency) over the responses, because the model
    predicts the mean of ln(latency): an arithmetic mean would count a backend
    whose answers mix 0.15 ms failures and 5 ms successes as mispredicted.  It
    comes from the latency histogram, which only tells that each response lies
    within its bucket's bounds: so the observation is the interval between the
    means of the lower and of the upper bounds, and the error is the distance
    of ln(predicted) to that interval (0 inside).  Judging against one point per
    bucket would count a correct 0.15 ms prediction for fast failures as 0.8
    off (the first bucket's middle is 0.35 ms)."""

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
        h, n = hist[has], resp[has]
        lo, hi = (h @ BUCKET_LOG_LO) / n, (h @ BUCKET_LOG_HI) / n
        pred = np.log(np.maximum(self.pred[has], 1e-5))
        ratio = np.maximum(0.0, np.maximum(lo - pred, pred - hi))
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
