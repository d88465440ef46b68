"""Per (backend, class) state folded from worker stats, and the feature matrix.

Workers report cumulative counters (`lb.core.messages.WorkerStats`) every
`learning.stats_interval`.  `StatsFolder.ingest` turns them into per-(pid)
differences and accumulates them until the next tick; `StatsFolder.fold`
moves the accumulated differences into time-decayed state (a time constant of
`TAU` seconds, so the result does not depend on the tick interval) and
`StatsFolder.features` builds the (classes x backends, F) matrix.

Everything is numpy over arrays shaped (C, B) or (C, B, N_BUCKETS): building
features for 1,000 backends x 8 classes is a handful of vector operations.
Row `c * B + b` of the matrix is backend `b`, class `c`.
"""

from __future__ import annotations

import math

import numpy as np

from lb.core.messages import LATENCY_BOUNDS, N_BUCKETS, WorkerStats

# The model's input columns, in order.  Stored in the ONNX metadata and checked
# when a model is loaded: a model trained on other features is refused.
FEATURES = (
    "lat_ewma_log",  # ln EWMA mean time to response head of (backend, class), seconds
    "lat_p95_log",  # ln recent p95 of (backend, class) (decayed histogram)
    "err_rate",  # EWMA error rate of (backend, class)
    "err_rate_backend",  # EWMA error rate of the backend over all classes
    "inflight_log",  # ln(1 + in-flight requests to the backend, summed over workers)
    "share",  # the backend's share of the class's recent traffic
    "rate_log",  # ln(1 + requests per second sent to the backend)
    "peak_ewma_log",  # ln of the workers' mean peak-EWMA latency of the backend
    "age_log",  # ln(1 + seconds since the backend last became live), capped at AGE_CAP
    "weight_rel",  # configured weight / mean configured weight
    "class_lat_log",  # ln of the class's mean latency over all backends (heaviness)
    "samples_log",  # ln(1 + recent responses of (backend, class)): how much the above is worth
)
N_FEATURES = len(FEATURES)

TAU = 0.5  # seconds: time constant of the decayed latency/error state
TAU_HIST = 1.0  # seconds: time constant of the decayed histograms (p95)
AGE_CAP = 600.0
PRIOR_LATENCY = 0.01  # seconds, when nothing at all has been observed
MIN_LATENCY = 1e-4
PID_TIMEOUT = 3.0  # seconds without a report: the worker's gauges are dropped

# Representative latency of each histogram bucket: its upper bound (the
# overflow bucket counts as twice the last bound).
_BUCKET_VALUE = np.array(list(LATENCY_BOUNDS) + [LATENCY_BOUNDS[-1] * 2], dtype=np.float64)
# ln of a typical latency inside each bucket (geometric middle of its bounds):
# the online prediction error compares predicted ln(latency) with these
_LOWER = np.array([LATENCY_BOUNDS[0] / 2] + list(LATENCY_BOUNDS), dtype=np.float64)
BUCKET_LOG_MID = 0.5 * (np.log(_LOWER) + np.log(_BUCKET_VALUE))
# ln of each bucket's bounds, for judging a prediction against what a histogram can
# tell: the first bucket reaches down to 50 us (a fast failure through lb takes
# ~0.15 ms, well inside it), the overflow bucket up to twice the last bound
BUCKET_LOG_LO = np.log(np.array([LATENCY_BOUNDS[0] / 10] + list(LATENCY_BOUNDS), dtype=np.float64))
BUCKET_LOG_HI = np.log(_BUCKET_VALUE)


class _Worker:
    """The last cumulative counters of one worker pid, in its own backend order."""

    __slots__ = ("names", "classes", "bidx", "cidx", "requests", "nores", "resp", "errs", "lsum",
                 "hist", "inflight", "ewma", "seen", "resp_lists")

    def __init__(self, stats: WorkerStats, bindex: dict[str, int], cindex: dict[str, int]) -> None:
        self.names = tuple(b.name for b in stats.backends)
        self.classes = tuple(stats.classes)
        # config index per reported backend / class (-1: not in the config)
        self.bidx = np.array([bindex.get(n, -1) for n in self.names], dtype=np.int64)
        self.cidx = np.array([cindex.get(n, -1) for n in self.classes], dtype=np.int64)
        self.seen = 0.0
        self.resp_lists = None


def _arrays(stats: WorkerStats, nc: int, prev: "_Worker | None"):
    """Cumulative counters of one report as arrays (backend-major).

    Converting the histograms is most of the cost (backends x classes x 23
    Python ints), so a backend whose per-class response counts did not change
    since the worker's previous report keeps its previous histogram rows."""
    bs = stats.backends
    nb = len(bs)
    requests = np.fromiter((b.requests for b in bs), dtype=np.float64, count=nb)
    nores = np.fromiter((b.responses[0] if b.responses else 0 for b in bs), dtype=np.float64, count=nb)
    inflight = np.fromiter((b.inflight for b in bs), dtype=np.float64, count=nb)
    ewma = np.fromiter((b.ewma for b in bs), dtype=np.float64, count=nb)
    resp_lists = [b.class_responses for b in bs]
    try:
        resp = np.array(resp_lists, dtype=np.float64).reshape(nb, nc)
        errs = np.array([b.class_errors for b in bs], dtype=np.float64).reshape(nb, nc)
        lsum = np.array([b.class_latency_sum for b in bs], dtype=np.float64).reshape(nb, nc)
        if prev is not None and getattr(prev, "resp_lists", None) is not None:
            old = prev.resp_lists
            changed = [i for i in range(nb) if resp_lists[i] != old[i]]
            hist = prev.hist.copy()
            if changed:
                hist[changed] = np.array([bs[i].class_latency for i in changed],
                                         dtype=np.float64).reshape(len(changed), nc, N_BUCKETS)
        else:
            hist = np.array([b.class_latency for b in bs], dtype=np.float64).reshape(nb, nc, N_BUCKETS)
    except ValueError:
        return None  # ragged or mis-sized per-class lists: the report is ignored
    return requests, nores, inflight, ewma, resp, errs, lsum, hist, resp_lists


class StatsFolder:
    def __init__(self, backends: list[str], weights: list[int], classes: list[str], now: float) -> None:
        self.backends = list(backends)
        self.classes = list(classes)
        self.bindex = {n: i for i, n in enumerate(self.backends)}
        self.cindex = {n: i for i, n in enumerate(self.classes)}
        B, C = len(self.backends), len(self.classes)
        self.B, self.C = B, C
        w = np.asarray(weights, dtype=np.float64)
        self.weight_rel = w / max(w.mean(), 1e-9) if B else w
        self.workers: dict[int, _Worker] = {}
        self.reports = 0  # reports that produced differences
        # accumulated since the last fold
        self.acc_requests = np.zeros(B)
        self.acc_nores = np.zeros(B)
        self.acc_resp = np.zeros((C, B))
        self.acc_errs = np.zeros((C, B))
        self.acc_lsum = np.zeros((C, B))
        self.acc_hist = np.zeros((C, B, N_BUCKETS))
        # decayed state
        self.d_resp = np.zeros((C, B))
        self.d_att = np.zeros((C, B))  # attempts: responses + failures without one
        self.d_errs = np.zeros((C, B))
        self.d_lsum = np.zeros((C, B))
        self.d_hist = np.zeros((C, B, N_BUCKETS))
        self.rate = np.zeros(B)  # requests per second, decayed
        self.live_since = np.full(B, now - AGE_CAP)
        self.last_fold = now
        # what the last fold observed (for the online prediction error and the
        # error predictions' record): latency histogram, attempts, errors
        self.last_hist = np.zeros((C, B, N_BUCKETS))
        self.last_att = np.zeros((C, B))
        self.last_errs = np.zeros((C, B))

    # -- input -------------------------------------------------------------------------------

    def ingest(self, stats: WorkerStats, now: float) -> bool:
        """Add one worker report.  Returns True if it carried differences."""
        w = self.workers.get(stats.pid)
        names = tuple(b.name for b in stats.backends)
        if w is None or w.names != names or w.classes != tuple(stats.classes):
            w = _Worker(stats, self.bindex, self.cindex)
            self.workers[stats.pid] = w
            first = True
        else:
            first = False
        arrs = _arrays(stats, len(stats.classes), None if first else w)
        if arrs is None:
            return False
        requests, nores, inflight, ewma, resp, errs, lsum, hist, w.resp_lists = arrs
        w.inflight, w.ewma, w.seen = inflight, ewma, now
        if first or (requests < w.requests).any() or (resp < w.resp).any():
            # a new worker (or one whose counters went back): this report is the baseline
            w.requests, w.nores, w.resp, w.errs, w.lsum, w.hist = requests, nores, resp, errs, lsum, hist
            return False
        d_req, d_nores = requests - w.requests, nores - w.nores
        d_resp, d_errs, d_lsum, d_hist = resp - w.resp, errs - w.errs, lsum - w.lsum, hist - w.hist
        w.requests, w.nores, w.resp, w.errs, w.lsum, w.hist = requests, nores, resp, errs, lsum, hist
        bsel = w.bidx >= 0
        csel = w.cidx >= 0
        bi, ci = w.bidx[bsel], w.cidx[csel]
        np.add.at(self.acc_requests, bi, d_req[bsel])
        np.add.at(self.acc_nores, bi, d_nores[bsel])
        # (nb, nc) -> config (C, B)
        sub = np.ix_(ci, bi)
        self.acc_resp[sub] += d_resp[np.ix_(bsel, csel)].T
        self.acc_errs[sub] += d_errs[np.ix_(bsel, csel)].T
        self.acc_lsum[sub] += d_lsum[np.ix_(bsel, csel)].T
        self.acc_hist[sub] += d_hist[bsel][:, csel].transpose(1, 0, 2)
        self.reports += 1
        return True

    def resize(self, backends: list[str], weights: list[int], now: float) -> None:
        """The fleet changed: per-backend state follows each backend by name;
        a backend new to the fleet starts empty and young (slow start age)."""
        old = self.bindex
        take = np.array([old.get(n, -1) for n in backends], dtype=np.int64)
        have = np.nonzero(take >= 0)[0]

        def remap(a: np.ndarray, fill: float = 0.0) -> np.ndarray:
            axis = 1 if a.ndim == 3 else a.ndim - 1  # (B), (C, B), (C, B, buckets)
            shape = list(a.shape)
            shape[axis] = len(backends)
            out = np.full(shape, fill, dtype=a.dtype)
            dst, src = [slice(None)] * a.ndim, [slice(None)] * a.ndim
            dst[axis], src[axis] = have, take[have]
            out[tuple(dst)] = a[tuple(src)]
            return out

        for attr in ("acc_requests", "acc_nores", "rate", "acc_resp", "acc_errs", "acc_lsum",
                     "d_resp", "d_att", "d_errs", "d_lsum", "acc_hist", "d_hist", "last_hist",
                     "last_att", "last_errs"):
            setattr(self, attr, remap(getattr(self, attr)))
        self.live_since = remap(self.live_since, now)
        if getattr(self, "_live", None) is not None:
            self._live = remap(self._live, True)
        self.backends = list(backends)
        self.bindex = {n: i for i, n in enumerate(self.backends)}
        self.B = len(self.backends)
        w = np.asarray(weights, dtype=np.float64)
        self.weight_rel = w / max(w.mean(), 1e-9) if self.B else w
        for wk in self.workers.values():  # the workers' own orders map anew
            wk.bidx = np.array([self.bindex.get(n, -1) for n in wk.names], dtype=np.int64)

    def set_live(self, live: np.ndarray, now: float) -> None:
        """Record down -> up transitions (health/slow-start age)."""
        prev = getattr(self, "_live", None)
        if prev is not None:
            came_up = live & ~prev
            self.live_since[came_up] = now
        self._live = live.copy()

    # -- folding -----------------------------------------------------------------------------

    def fold(self, now: float) -> None:
        dt = max(now - self.last_fold, 1e-3)
        self.last_fold = now
        keep = math.exp(-dt / TAU)
        keep_h = math.exp(-dt / TAU_HIST)
        # failures without a response are counted per backend; spread them over
        # the classes in proportion to the class's errors
        errs_tot = self.acc_errs.sum(axis=0)
        nores_c = np.where(errs_tot > 0, self.acc_errs / np.maximum(errs_tot, 1e-9), 1.0 / max(self.C, 1))
        nores_c = nores_c * self.acc_nores
        self.d_resp = self.d_resp * keep + self.acc_resp
        self.d_att = self.d_att * keep + self.acc_resp + nores_c
        self.d_errs = self.d_errs * keep + self.acc_errs
        self.d_lsum = self.d_lsum * keep + self.acc_lsum
        self.d_hist = self.d_hist * keep_h + self.acc_hist
        self.rate = self.rate * keep + (1 - keep) * (self.acc_requests / dt)
        self.last_hist = self.acc_hist
        self.last_att = self.acc_resp + nores_c
        self.last_errs = self.acc_errs
        self.acc_requests = np.zeros(self.B)
        self.acc_nores = np.zeros(self.B)
        self.acc_resp = np.zeros((self.C, self.B))
        self.acc_errs = np.zeros((self.C, self.B))
        self.acc_lsum = np.zeros((self.C, self.B))
        self.acc_hist = np.zeros((self.C, self.B, N_BUCKETS))
        # drop the gauges of workers that went silent
        for pid in [p for p, w in self.workers.items() if now - w.seen > PID_TIMEOUT]:
            del self.workers[pid]

    def gauges(self) -> tuple[np.ndarray, np.ndarray]:
        """(in-flight summed over workers, mean peak-EWMA) per config backend."""
        inflight = np.zeros(self.B)
        ewma_sum = np.zeros(self.B)
        ewma_n = np.zeros(self.B)
        for w in self.workers.values():
            if not hasattr(w, "inflight"):
                continue
            sel = w.bidx >= 0
            np.add.at(inflight, w.bidx[sel], w.inflight[sel])
            pos = sel & (w.ewma > 0)
            np.add.at(ewma_sum, w.bidx[pos], w.ewma[pos])
            np.add.at(ewma_n, w.bidx[pos], 1.0)
        ewma = np.where(ewma_n > 0, ewma_sum / np.maximum(ewma_n, 1), 0.0)
        return inflight, ewma

    def features(self, now: float) -> np.ndarray:
        """The (C * B, F) float32 matrix, row c * B + b."""
        C, B = self.C, self.B
        inflight, peak = self.gauges()
        resp = self.d_resp
        has = resp > 1e-3
        lat = np.where(has, self.d_lsum / np.maximum(resp, 1e-9), np.nan)
        # fill unobserved cells: the backend over all classes, then the class over all
        # backends, then the workers' peak EWMA, then a prior
        b_resp = resp.sum(axis=0)
        b_lat = np.where(b_resp > 1e-3, self.d_lsum.sum(axis=0) / np.maximum(b_resp, 1e-9), np.nan)
        c_resp = resp.sum(axis=1)
        c_lat = np.where(c_resp > 1e-3, self.d_lsum.sum(axis=1) / np.maximum(c_resp, 1e-9), np.nan)
        all_resp = resp.sum()
        overall = self.d_lsum.sum() / all_resp if all_resp > 1e-3 else PRIOR_LATENCY
        c_lat = np.where(np.isnan(c_lat), overall, c_lat)
        peak_b = np.where(peak > 0, peak, np.nan)
        fill = np.where(np.isnan(b_lat), peak_b, b_lat)[None, :]
        lat = np.where(np.isnan(lat), fill, lat)
        lat = np.where(np.isnan(lat), c_lat[:, None], lat)
        lat = np.maximum(lat, MIN_LATENCY)
        # p95 from the decayed histograms
        tot = self.d_hist.sum(axis=2)
        cum = np.cumsum(self.d_hist, axis=2)
        idx = (cum < 0.95 * tot[:, :, None]).sum(axis=2)
        p95 = _BUCKET_VALUE[np.minimum(idx, N_BUCKETS - 1)]
        p95 = np.where(tot > 1e-3, p95, lat * 1.5)
        att = self.d_att
        err = np.where(att > 1e-3, self.d_errs / np.maximum(att, 1e-9), 0.0)
        b_att = att.sum(axis=0)
        err_b = np.where(b_att > 1e-3, self.d_errs.sum(axis=0) / np.maximum(b_att, 1e-9), 0.0)
        share = np.where(c_resp[:, None] > 1e-3, resp / np.maximum(c_resp[:, None], 1e-9),
                         1.0 / max(B, 1))
        age = np.minimum(np.maximum(now - self.live_since, 0.0), AGE_CAP)
        peak_f = np.where(peak > 0, peak, np.nanmean(lat, axis=0) if C else PRIOR_LATENCY)
        X = np.empty((C, B, N_FEATURES), dtype=np.float32)
        X[:, :, 0] = np.log(lat)
        X[:, :, 1] = np.log(np.maximum(p95, MIN_LATENCY))
        X[:, :, 2] = np.clip(err, 0.0, 1.0)
        X[:, :, 3] = np.clip(err_b, 0.0, 1.0)[None, :]
        X[:, :, 4] = np.log1p(inflight)[None, :]
        X[:, :, 5] = share
        X[:, :, 6] = np.log1p(self.rate)[None, :]
        X[:, :, 7] = np.log(np.maximum(peak_f, MIN_LATENCY))[None, :]
        X[:, :, 8] = np.log1p(age)[None, :]
        X[:, :, 9] = self.weight_rel[None, :]
        X[:, :, 10] = np.log(np.maximum(c_lat, MIN_LATENCY))[:, None]
        X[:, :, 11] = np.log1p(resp)
        return X.reshape(C * B, N_FEATURES)
