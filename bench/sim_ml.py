"""The `ml` policy in the simulator: real worker telemetry into the real inference engine.

Every `sim_model.STATS_INTERVAL` simulated seconds each simulated worker builds its
`lb.core.messages.WorkerStats` with `workers.telemetry.build_stats` (what a worker
sends), `inference.engine.Engine` ingests them and computes a
`lb.core.messages.Table` in one tick, and every worker's `TableStrategy` gets it
(`set_table`, then `check` for its mode), as a worker does when a table
arrives.  Simulated time stands in for the clock everywhere: stats
timestamps, table timestamps and age, the engine's `now`.

Trace samples are taken by the workers' own `Tracer` (the `learning.
trace_sample` share of requests, stamped with the table they were routed
with); the engine joins them with that table's features, and with `--traces
DIR` the joined records are written in the inference process's format
(`inference.traces`), ready for `lb train`.

When the inference code is not importable, `attach` returns no bridge and
`ml` runs as a worker does without tables: on its own load curves.

`IdentityModel` stands in for the ONNX model in the `ml-identity` ablation:
it has `inference.model.Model`'s interface (`predict`, `version`,
`features`) and predicts what the cell showed, so the same engine, weights,
costs, pick and guard run without the network.  One bridge (one engine) per
lb instance: two instances sharing a fleet each see only their own workers.
"""

from __future__ import annotations

import os

import scenarios as scn  # bench/scenarios.py


class IdentityModel:
    """The model replaced by the identity: latency = exp(lat_ewma_log), the
    cell's observed mean; error = err_rate, its observed error rate."""

    version = "identity"

    def __init__(self) -> None:
        from inference.features import FEATURES

        self.features = FEATURES
        self.path = "<identity>"
        self._lat = FEATURES.index("lat_ewma_log")
        self._err = FEATURES.index("err_rate")

    def predict(self, X):
        import numpy as np

        X = np.asarray(X, dtype=np.float64)
        lat = np.clip(np.exp(X[:, self._lat]), 1e-5, 60.0)
        err = np.clip(X[:, self._err], 0.0, 1.0)
        return lat, err


_MODELS: dict = {}  # path -> loaded Model: one onnxruntime session per process, not per run


def attach(sim, model_path: str | None, traces_dir: str | None = None, *, workers=None,
           identity: bool = False, instance: int = 0):
    """(bridge or None, note for the results table).  `workers`: the simulated
    workers of one lb instance (default: all of them)."""
    try:
        from inference.engine import Engine
        from inference.model import DEFAULT_MODEL, Model
        from workers.telemetry import Tracer, build_stats
    except ImportError as exc:
        return None, f"fallback: {exc.name or 'inference'} not importable"
    if identity:
        model = IdentityModel()
    else:
        path = model_path or DEFAULT_MODEL
        try:
            model = _MODELS.get(path) or Model.load(path)
        except Exception as exc:  # noqa: BLE001 - e.g. ModelError: the run goes on, on the fallback
            return None, f"fallback: {exc}"[:80]
        _MODELS[path] = model
    workers = sim.workers if workers is None else workers
    return Bridge(sim, Engine, model, Tracer, build_stats, traces_dir, workers, instance), ""


def engine_config(sim, trace_sample: float):
    """The lb config the inference process would get for this scenario."""
    from lb.core.config import from_dict

    return from_dict({
        "strategy": "ml",
        "backends": [{"address": f"127.0.0.1:{20000 + i}", "name": s.name, "weight": s.weight}
                     for i, s in enumerate(sim.sc.backends)],
        "classes": [{"name": scn.CLASSES[1], "path_prefix": scn.PATHS[1]}],
        "learning": {"trace_sample": trace_sample,
                     **({"exploration": sim.exploration} if getattr(sim, "exploration", None) is not None
                        else {})},
    }, "<simulated>")


class Bridge:
    def __init__(self, sim, Engine, model, Tracer, build_stats, traces_dir: str | None,
                 workers=None, instance: int = 0) -> None:
        self.sim = sim
        self.workers = sim.workers if workers is None else workers
        self.instance = instance
        self.build_stats = build_stats
        self.traces_dir = traces_dir
        # Sampling costs simulated work only: take more when traces are wanted.
        sample = 0.02 if traces_dir is None else 0.2
        cfg = engine_config(sim, sample)
        if list(cfg.class_names) != list(scn.CLASSES):
            raise ValueError(f"class names {cfg.class_names} != {scn.CLASSES}")
        self.engine = Engine(cfg, model, now=0.0)
        self.engine.set_control(None)
        self.epoch = 1 + sim.seed + 1000 * instance
        self.seq = 0
        self.modes: dict[str, int] = {}  # table mode/reason -> ticks
        self.records: list = []
        self.tracers = []
        for w in self.workers:
            tracer = Tracer(sample, seed=1000 + w.slot + 100 * instance, clock=lambda: sim.now)
            for b in w.backends:
                b.tracer = tracer
            self.tracers.append(tracer)

    def tick(self, now: float) -> None:
        for w, tracer in zip(self.workers, self.tracers):
            w.seq += 1
            counters = {"connections": 0, "accepted": w.requests, "requests": w.requests,
                        "rejected": 0, "timeouts": w.timeouts, "no_backend": w.no_backend}
            stats = self.build_stats(
                w.backends, scn.CLASSES, slot=w.slot, pid=100000 + w.slot, generation=1,
                seq=w.seq, ts=now, counters=counters, strategy=w.strategy,
                traces=tracer.drain(),
            )
            self.engine.ingest(stats, now)
        self.seq += 1
        table = self.engine.tick(now, self.epoch, self.seq)
        key = table.mode + (f": {table.reason}" if table.reason else "")
        for k, (w, tracer) in enumerate(zip(self.workers, self.tracers)):
            if hasattr(w.strategy, "set_table"):
                w.strategy.set_table(table)
                learned, reason = w.strategy.check(now)
                if k == 0 and table.mode == "learned" and not learned:
                    key = f"fallback: {reason}"  # the worker's own verdict (the guard)
            tracer.install(table.epoch, table.seq, now)
        self.modes[key] = self.modes.get(key, 0) + 1
        if self.traces_dir is not None:
            rec = self.engine.take_records()
            if rec is not None:
                self.records.append(rec)

    def note(self) -> str:
        """How the tables' modes were spread over the run, e.g. 'learned 97%'."""
        total = sum(self.modes.values()) or 1
        top = [kv for kv in sorted(self.modes.items(), key=lambda kv: -kv[1])[:2]
               if kv[1] / total >= 0.01]
        return ", ".join(f"{k} {v / total:.0%}" for k, v in top)

    def write_traces(self) -> str | None:
        """This run's joined records as one trace file (npz, the inference format)."""
        if self.traces_dir is None or not self.records:
            return None
        from inference import traces

        os.makedirs(self.traces_dir, exist_ok=True)
        lb = f"-lb{self.instance + 1}" if self.instance else ""
        name = f"sim-{self.sim.sc.name}-{self.sim.policy}-seed{self.sim.seed}{lb}.npz"
        return traces.write(self.traces_dir, traces.concat(self.records), name)
