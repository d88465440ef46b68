"""The inference policy, free of I/O: stats in, tables out.

The inference process (`inference/process.py`) and the discrete-event
simulator (`bench/sim.py`) drive the very same `Engine`:

    engine = Engine(cfg, model, now=t0)          # model None: fallback "model_error"
    engine.ingest(worker_stats, now)             # any number of times
    engine.set_control(control)                  # drained / down backends
    engine.set_fleet(control.fleet, now)         # backends added, removed, reweighed
    table = engine.tick(now, epoch, seq)         # once per learning.interval

One tick folds the stats received since the previous one, builds the feature
matrix of every (backend x class), scores it with ONE batched model call and
turns the predictions into weights (`inference/policy.py`).  The engine also
joins the trace samples carried by the stats with the features of the table
they were routed with (`take_records`), and reports mode changes and other
events (`take_events`) for the caller to log.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from inference import policy
from inference.features import FEATURES, N_FEATURES, StatsFolder
from inference.model import Model
from lb.core.config import Config
from lb.core.messages import Control, Table, WorkerStats

KEPT_TABLES = 100  # feature matrices kept for joining trace samples
ERR_RATE = FEATURES.index("err_rate")  # the cell's observed error rate
MAX_RECORDS = 200_000  # joined records held until taken


class Records:
    """Joined trace records, column-wise."""

    def __init__(self) -> None:
        self.features: list[np.ndarray] = []
        self.latency: list[float] = []
        self.ok: list[bool] = []
        self.backend: list[str] = []
        self.cls: list[str] = []
        self.ts: list[float] = []

    def __len__(self) -> int:
        return len(self.latency)

    def arrays(self) -> dict[str, np.ndarray]:
        n = len(self)
        return {
            "features": np.array(self.features, dtype=np.float32).reshape(n, N_FEATURES),
            "latency": np.array(self.latency, dtype=np.float32),
            "ok": np.array(self.ok, dtype=bool),
            "backend": np.array(self.backend, dtype=str),
            "cls": np.array(self.cls, dtype=str),
            "ts": np.array(self.ts, dtype=np.float64),
        }


class Engine:
    def __init__(self, cfg: Config, model: "Model | None", *, now: float, model_error: str = "") -> None:
        self.cfg = cfg
        self.learning = cfg.learning
        self.backends = [b.name for b in cfg.backends]
        self.classes = list(cfg.class_names)
        self.cfg_weights = np.array([b.weight for b in cfg.backends], dtype=np.float64)
        self.folder = StatsFolder(self.backends, [b.weight for b in cfg.backends], self.classes, now)
        self.model = model
        self.model_error = model_error if model is None else ""
        self.confidence = policy.Confidence(cfg.learning.max_prediction_error)
        # whose error prediction prices the picks
        self.errors = policy.ErrorRecord(cfg.learning.model_errors == "earned")
        self.control: Control | None = None
        self.live = np.ones(len(self.backends), dtype=bool)
        self.mode = ""
        self.reason = ""
        self.last_tick = now
        self.tick_seconds = 0.0
        self.tables: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.records = Records()
        self.records_dropped = 0
        self.unjoined = 0  # samples whose table was no longer (or never) known
        self.events: list[tuple[str, dict]] = []
        self.folder.set_live(self.live, now)

    # -- inputs --------------------------------------------------------------------------------

    def ingest(self, stats: WorkerStats, now: float) -> None:
        """One worker report (cumulative counters; differences are taken per pid)."""
        self.folder.ingest(stats, now)
        if stats.traces:
            self._join(stats)

    def set_control(self, control: Control | None) -> None:
        self.control = control
        out = set(control.drained) | set(control.down) if control is not None else set()
        self.live = np.array([n not in out for n in self.backends], dtype=bool)
        self.folder.set_live(self.live, self.folder.last_fold)

    def set_fleet(self, fleet, now: float) -> bool:
        """The admin's fleet (`FleetBackend`s): the tables cover exactly its
        backends from the next tick.  True if it changed."""
        names = [fb.name for fb in fleet]
        weights = [fb.weight for fb in fleet]
        if names == self.backends and weights == self.cfg_weights.tolist():
            return False
        self.folder.resize(names, weights, now)
        self.backends = names
        self.cfg_weights = np.array(weights, dtype=np.float64)
        self.tables.clear()  # their feature rows are laid out for the old fleet
        self.set_control(self.control)
        return True

    def set_model(self, model: Model) -> None:
        """Hot swap: the next tick scores with `model`; its track record starts afresh."""
        self.model = model
        self.model_error = ""
        self.confidence.reset()
        self.errors.reset()

    # -- the tick ----------------------------------------------------------------------------------

    def tick(self, now: float, epoch: int, seq: int) -> Table:
        t0 = time.perf_counter()
        dt = max(now - self.last_tick, 1e-3)
        self.last_tick = now
        f = self.folder
        f.fold(now)
        self.confidence.observe(f.last_hist, dt)
        self.errors.observe(f.last_att, f.last_errs, dt)
        X = f.features(now)
        C, B = len(self.classes), len(self.backends)
        latency = error = None
        predict_error = ""
        if self.model is not None and B:
            try:
                lat, err = self.model.predict(X)
                latency, error = lat.reshape(C, B), err.reshape(C, B)
            except Exception as exc:  # noqa: BLE001 - a failing model must not stop the tables
                predict_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        self.confidence.pred = latency
        low = self.confidence.update_low() if latency is not None else False
        if self.model is None or predict_error:
            mode, reason = "fallback", "model_error"
        elif f.reports == 0:
            mode, reason = "fallback", "warming_up"
        elif not self.live.any():
            mode, reason = "fallback", "no_live_backend"
        elif low:
            mode, reason = "fallback", "low_confidence"
        else:
            mode, reason = "learned", ""
        cost = None
        error_weight: list[float] = []
        if mode == "learned":
            # errors as priced: the prediction shrunk towards what each cell showed,
            # as far as the model's error predictions have earned it
            priced = self.errors.price(error, X[:, ERR_RATE].reshape(C, B), f.d_att)
            w = policy.weights(latency, priced, self.live, self.learning.exploration)
            cost = policy.costs(latency, priced)
            if self.errors.earned:
                error_weight = np.broadcast_to(self.errors.trust(), (B,)).tolist()
        else:
            self.errors.pred = None  # nothing priced: nothing to judge at the next tick
            w = policy.static_weights(self.cfg_weights, self.live, C)
        self._remember(epoch, seq, X)
        pe = self.confidence.value()
        if (mode, reason) != (self.mode, self.reason):
            fields = {"mode": mode, "reason": reason, "previous": self.mode or None,
                      "prediction_error": round(pe, 4)}
            if reason == "model_error":
                fields["error"] = predict_error or self.model_error
            self.events.append(("policy_mode", fields))
            self.mode, self.reason = mode, reason
        self.tick_seconds = time.perf_counter() - t0
        return Table(
            epoch=epoch, seq=seq, ts=now, interval=self.learning.interval,
            model_version=self.model.version if self.model is not None else "",
            mode=mode, reason=reason, backends=list(self.backends), classes=list(self.classes),
            weights=w.tolist(),
            latency=latency.tolist() if latency is not None else [],
            error=error.tolist() if error is not None else [],
            prediction_error=pe, tick_seconds=self.tick_seconds,
            cost=cost.tolist() if cost is not None else [],
            exploration=self.learning.exploration if cost is not None else 0.0,
            error_weight=error_weight,
        )

    # -- traces ------------------------------------------------------------------------------------

    def _remember(self, epoch: int, seq: int, X: np.ndarray) -> None:
        self.tables[(epoch, seq)] = X
        while len(self.tables) > KEPT_TABLES:
            self.tables.popitem(last=False)

    def _join(self, stats: WorkerStats) -> None:
        B = len(self.backends)
        bindex, cindex = self.folder.bindex, self.folder.cindex
        r = self.records
        for s in stats.traces:
            X = self.tables.get((s.table_epoch, s.table_seq))
            if X is None or not 0 <= s.backend < len(stats.backends) or not 0 <= s.cls < len(stats.classes):
                self.unjoined += 1
                continue
            bname, cname = stats.backends[s.backend].name, stats.classes[s.cls]
            b, c = bindex.get(bname), cindex.get(cname)
            if b is None or c is None:
                self.unjoined += 1
                continue
            if len(r) >= MAX_RECORDS:
                self.records_dropped += 1
                continue
            r.features.append(X[c * B + b])
            r.latency.append(s.latency)
            r.ok.append(bool(s.ok))
            r.backend.append(bname)
            r.cls.append(cname)
            r.ts.append(stats.ts)

    def take_records(self) -> dict[str, np.ndarray] | None:
        """The records joined since the last call (column arrays), or None."""
        if not len(self.records):
            return None
        out = self.records.arrays()
        self.records = Records()
        return out

    def take_events(self) -> list[tuple[str, dict]]:
        ev, self.events = self.events, []
        return ev
