"""Everything the admin process knows, fed from ZeroMQ.

    workers    --PUB stats----->  SUB (bind stats_admin)   topic b"stats"
    supervisor --PUB status---->  same SUB                 topic b"status"
    inference  --PUB table----->  clone Subscriber         (tables, tables_snapshot)
    admin      --PUB control--->  clone Publisher          (control, control_snapshot)

`poll()` drains every socket without blocking; the process calls it when a
socket's descriptor is readable and from a 0.1 s timer (ZeroMQ descriptors
are edge-triggered, so a timer guards against a missed edge).
"""

from __future__ import annotations

import os
import time

import msgspec
import zmq

from lb.core import log
from lb.core.child import supervisor_pid
from lb.core.clone import Subscriber
from lb.core.config import Config, ConfigError, decode, load
from lb.core.messages import (
    TOPIC_STATS,
    TOPIC_STATUS,
    TOPIC_TABLE,
    Table,
    endpoints,
    stats_decoder,
    status_decoder,
    table_decoder,
)

from .capacity import CapacityView
from .control import ControlState
from .fleet import Fleet
from .loadhistory import LoadHistory
from .saved_counters import CounterStore
from .stats import Aggregator

STATUS_STALE = 5.0  # seconds without a SupervisorStatus before it is ignored


class AdminState:
    def __init__(self, cfg: Config, runtime_dir: str, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self._certs: list = []
        self._certs_of = None  # the config `_certs` was read for
        self.runtime_dir = runtime_dir
        self.started = time.time()
        self.ctx = ctx or zmq.Context.instance()
        ep = endpoints(runtime_dir)
        self.stats = self.ctx.socket(zmq.SUB)
        self.stats.setsockopt(zmq.LINGER, 0)
        self.stats.setsockopt(zmq.RCVHWM, 10000)
        self.stats.setsockopt(zmq.SUBSCRIBE, TOPIC_STATS)
        self.stats.setsockopt(zmq.SUBSCRIBE, TOPIC_STATUS)
        self.stats.bind(ep["stats_admin"])
        self.tables = Subscriber(self.ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE, table_decoder.decode)
        self.state_dir = cfg.state_dir or runtime_dir
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.fleet = Fleet(cfg, self.state_dir)
        self.control = ControlState(self.ctx, runtime_dir, self.fleet)
        self.agg = Aggregator([b.name for b in self.fleet.backends()])
        self.counters = CounterStore(runtime_dir, supervisor_pid())
        self.load = LoadHistory(self.state_dir)  # per-minute request rate, for the forecast
        self.load.load()
        self.capacity = CapacityView(self)
        self.counters.load(self.agg)  # a restarted admin process continues the counters
        self.last_mode: tuple[str, str] | None = None
        self.generation: int | None = None
        self.discovery = None  # lb.admin.discovery.Discovery, once the process serves
        self.member = None  # lb.admin.etcd.Member with a [fleet]

    # -- input ---------------------------------------------------------------

    def fds(self) -> list[int]:
        return [self.stats.getsockopt(zmq.FD), *self.tables.fds(), self.control.publisher.router.getsockopt(zmq.FD)]

    def poll(self) -> None:
        while True:
            try:
                frames = self.stats.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 2:
                self.agg.bad += 1
                continue
            topic, payload = frames
            try:
                if topic == TOPIC_STATS:
                    ws = stats_decoder.decode(payload)
                    self.agg.offer_stats(ws)
                    self.capacity.offer(ws)
                elif topic == TOPIC_STATUS:
                    st = status_decoder.decode(payload)
                    self.agg.offer_status(st)
                    self._follow_generation(st.generation, st.config, st.config_path)
            except msgspec.DecodeError:
                self.agg.bad += 1
        self.tables.poll()
        self.control.publisher.serve_snapshots()

    def _follow_generation(self, generation: int, blob: bytes, path: str) -> None:
        """After a reload the supervisor reports a new generation with the
        config it now runs (request classes, backends, token), as msgpack; the
        file may have changed again since, so it is read only as a fallback.
        The admin process keeps its counters and history instead of restarting."""
        if self.generation is None:
            self.generation = generation  # the config on stdin is this generation's
            return
        if generation == self.generation:
            return
        self.generation = generation
        if blob:
            try:
                self._set_config(decode(blob))
                log.log("admin_config_reloaded", generation=generation, source="supervisor")
                return
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.log("admin_config_unreadable", generation=generation, error=str(exc))
        if not path:
            return
        try:
            cfg = load(path)
        except ConfigError as exc:
            log.log("admin_config_unreadable", generation=generation, error=str(exc))
            return
        self._set_config(cfg)
        log.log("admin_config_reloaded", generation=generation, path=path)

    def _set_config(self, cfg: Config) -> None:
        self.cfg = cfg
        self.fleet.set_config(cfg)
        self.fleet_changed()

    def fleet_changed(self) -> None:
        """Publish the fleet at once (the workers apply it within milliseconds)."""
        self.control.publish()

    def tick(self) -> None:
        """Once a second: history sample, control republish, pid retirement."""
        self.poll()
        self.control.tick()
        self.agg.retire()
        self.counters.save(self.agg)
        sample = self.agg.sample()
        sample.weights = self.effective_weights()
        self.load.observe(sample.ts, sample.workers.get("requests", 0))
        self.load.save()  # (only when a minute was added)
        self.capacity.update()
        mode = self.mode()
        if mode != self.last_mode and self.strategy() == "ml":
            log.log("policy_mode", mode=mode[0], reason=mode[1])
        self.last_mode = mode

    # -- derived -------------------------------------------------------------

    def certificates(self) -> list:
        """The HTTPS listener's certificates as the running config names them
        (lb/core/tls.py CertInfo), read again after each reload."""
        if self._certs_of is not self.cfg:
            from lb.core import tls

            infos = []
            for i, c in enumerate(self.cfg.tls.certificates):
                try:
                    infos.append(tls.inspect(c.cert, c.key, f"tls.certificates[{i}]"))
                except ConfigError as exc:
                    log.log("admin_certificate_unreadable", error=str(exc))
            self._certs, self._certs_of = infos, self.cfg
        return self._certs

    @property
    def table(self) -> Table | None:
        return self.tables.state

    def status(self):
        st = self.agg.status
        if st is None or time.monotonic() - self.agg.status_at > STATUS_STALE:
            return None
        return st

    def config_strategy(self) -> str:
        st = self.status()
        return st.strategy if st is not None and st.strategy else self.cfg.strategy

    def strategy(self) -> str:
        """The strategy in force: the pinned one, else the config's."""
        return self.control.pinned or self.config_strategy()

    def backend_names(self) -> list[str]:
        """The fleet's backends, then any other one live workers or the table
        name (a reload in flight), in a stable order."""
        names = [b.name for b in self.fleet.backends()]
        extra = {b.name for ws in self.agg.live_workers() for b in ws.backends}
        t = self.table
        if t is not None:
            extra.update(t.backends)
        names += [n for n in self.agg.order if n in extra and n not in names]
        names += sorted(n for n in extra if n not in names)
        return names

    def config_weights(self) -> dict[str, int]:
        weights = dict(self.agg.gauges().config_weight)  # what workers run now (after reloads)
        weights.update({b.name: b.weight for b in self.fleet.backends()})
        return weights

    def mode(self) -> tuple[str, str]:
        """(mode, reason) of the learned policy: what most live workers report,
        else what the table says, judged for staleness like the workers do."""
        g = self.agg.gauges()
        votes: dict[tuple[str, str], int] = {}
        for (_strategy, mode, reason), n in g.modes.items():
            if mode:
                votes[(mode, reason)] = votes.get((mode, reason), 0) + n
        if votes:
            return max(votes, key=votes.__getitem__)
        t = self.table
        if t is None:
            return ("fallback", "no_table")
        if time.time() - t.ts > 2 * t.interval:
            return ("fallback", "stale")
        return (t.mode, t.reason)

    def table_weight(self, name: str) -> dict[str, float]:
        t = self.table
        if t is None or name not in t.backends:
            return {}
        i = t.backends.index(name)
        return {cls: row[i] for cls, row in zip(t.classes, t.weights) if i < len(row)}

    def routable(self) -> list[str]:
        weights = self.config_weights()
        return [n for n in self.backend_names()
                if weights.get(n, 0) > 0 and n not in self.control.drained and n not in self.control.down]

    def effective_weights(self) -> dict[str, float]:
        """The share each backend is meant to get now: the table's weights
        (averaged over classes) when the learned policy routes, else the
        configured weights (weighted strategies) or equal shares."""
        names = self.backend_names()
        cfgw = self.config_weights()
        routable = set(self.routable())
        strategy = self.strategy()
        t = self.table
        if strategy == "ml" and t is not None and t.weights and self.mode()[0] == "learned":
            out = {}
            for n in names:
                w = self.table_weight(n)
                out[n] = (sum(w.values()) / len(w)) if w and n in routable else 0.0
        elif strategy != "round_robin":  # every other strategy weighs backends by their weight
            out = {n: float(cfgw.get(n, 0)) if n in routable else 0.0 for n in names}
        else:
            out = {n: 1.0 if n in routable else 0.0 for n in names}
        total = sum(out.values())
        return {n: (w / total if total else 0.0) for n, w in out.items()}

    def close(self) -> None:
        self.counters.save(self.agg)
        self.load.save()
        self.stats.close()
        self.tables.close()
        self.control.close()


def admin_token(cfg: Config) -> str:
    return cfg.admin.token or os.environ.get("LB_ADMIN_TOKEN", "")
