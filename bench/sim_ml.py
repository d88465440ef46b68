"""The `ml` policy in the simulator: real worker telemetry into the real inference engine.

Every `STATS_INTERVAL` simulated seconds each simulated worker builds its
`lb.messages.WorkerStats` with `workers.telemetry.build_stats` (the same
function a worker uses before sending), the engine ingests them and computes
a `lb.messages.Table`, and every worker's `TableStrategy` gets it, exactly as
a worker does when a table arrives.  Simulated time stands in for the clock
everywhere (stats timestamps, table age, the engine's `now`).

When the inference code is not importable, `attach` returns no bridge and
`ml` runs on its fallback (P2C-EWMA), which is what lb does with no table.
"""

from __future__ import annotations

import os

import msgspec

import scenarios as scn  # bench/scenarios.py


def attach(sim, model_path: str | None):
    """(bridge or None, note for the results table)."""
    try:
        from inference.engine import Engine
        from inference.model import Model
        from workers.telemetry import build_stats
    except ImportError as exc:
        return None, f"fallback: {exc.name or 'inference'} missing"
    try:
        return Bridge(sim, Engine, Model, build_stats, model_path), ""
    except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
        return None, f"fallback: {type(exc).__name__}: {exc}"[:80]


def _engine_config(sim):
    """The lb config the engine would get from the supervisor for this scenario."""
    from lb.config import Config

    backends = [{"address": f"127.0.0.1:{20000 + i}", "name": s.name, "weight": s.weight}
                for i, s in enumerate(sim.sc.backends)]
    raw = {"backends": backends, "strategy": "ml",
           "classes": [{"name": "heavy", "path_prefix": "/heavy"}]}
    return msgspec.convert(raw, Config)


class Bridge:
    def __init__(self, sim, Engine, Model, build_stats, model_path: str | None) -> None:
        self.sim = sim
        self.build_stats = build_stats
        cfg = _engine_config(sim)
        model = Model.load(model_path) if model_path else Model.load(_default_model_path(cfg))
        self.engine = Engine(cfg, model, now=0.0)
        self.engine.set_control(None)
        self.epoch = 1
        self.seq = 0
        self.tables = 0
        self.traces_path = os.environ.get("LB_SIM_TRACES") or None

    def tick(self, now: float) -> None:
        for w in self.sim.workers:
            w.seq += 1
            counters = {"connections": 0, "accepted": w.requests, "requests": w.requests,
                        "rejected": 0, "timeouts": w.timeouts, "no_backend": w.no_backend}
            stats = self.build_stats(
                w.backends, scn.CLASSES, slot=w.slot, pid=100000 + w.slot, generation=1,
                seq=w.seq, ts=now, counters=counters, strategy=w.strategy,
            )
            self.engine.ingest(stats, now)
        self.seq += 1
        table = self.engine.tick(now, self.epoch, self.seq)
        if table is None:
            return
        self.tables += 1
        for w in self.sim.workers:
            w.strategy.set_table(table)
            check = getattr(w.strategy, "check", None)
            if check is not None:
                check(now)


def _default_model_path(cfg) -> str:
    from inference import model as im

    path = getattr(im, "DEFAULT_MODEL", None) or cfg.learning.model
    if not path:
        raise FileNotFoundError("no default model path in inference.model")
    return path

