"""A worker's link to the rest of lb: periodic stats out, tables and control in.

Nothing here runs per request.  Every `learning.stats_interval` the worker
sends one `WorkerStats` (cumulative counters, latency histograms per backend
and request class, a few sampled traces) on a ZeroMQ PUB socket connected to
the inference and admin processes; sending never blocks (a receiver that is
down or slow just misses a report, and counters are cumulative).

Tables (from the inference process) and the operator's control state (from
the admin process) arrive through `lb.core.clone.Subscriber`s: the worker gets the
current versions at start, then every newer one, and routes from what it
holds (workers/control.py applies them).  Their sockets are watched by the event loop, so a new table is in use
within milliseconds of being published; the periodic timer also polls them,
which covers ZeroMQ's edge-triggered descriptors.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import deque

import zmq

from lb.core import messages as m
from lb.core.clone import Subscriber
from lb.core.log import log
from workers.control import Steering
from workers.learned import TableStrategy

MAX_TRACES = 256  # per report; the rest of a burst is not sampled


class Tracer:
    """Samples about one request in `every` (randomised so it cannot phase-lock
    with a traffic pattern); the samples leave with the next stats report.

    A sample is stamped with the table that was current when its request was
    dispatched, not when its answer came: the inference process joins it with
    that table's features (the state the routing decision saw), and a request
    that outlives a table must not be credited to the next one's features.
    `install` keeps when each recent table came (`clock` time, monotonic in a
    worker, simulated time in bench/sim.py); `take` looks up the one current at
    now - latency, the request's dispatch time."""

    __slots__ = ("every", "countdown", "samples", "epoch", "seq", "rng", "clock", "history")

    HISTORY = 64  # tables remembered: 6.4 s at the default interval, more than a request lasts

    def __init__(self, rate: float, seed: int = 0, clock=time.monotonic) -> None:
        self.rng = random.Random(seed or None)
        self.every = max(1, round(1 / rate)) if rate > 0 else 0
        self.samples: list[m.TraceSample] = []
        self.epoch = 0
        self.seq = 0
        self.clock = clock
        self.history: deque[tuple[float, int, int]] = deque(maxlen=self.HISTORY)  # (since, epoch, seq)
        self.countdown = self._next()

    def _next(self) -> int:
        return self.rng.randint(1, 2 * self.every - 1) if self.every else 1 << 62

    def install(self, epoch: int, seq: int, now: float | None = None) -> None:
        """A new table is current from `now` (default: the clock)."""
        self.epoch, self.seq = epoch, seq
        self.history.append((self.clock() if now is None else now, epoch, seq))

    def stamp(self, dispatched: float) -> tuple[int, int]:
        """(epoch, seq) of the table current at `dispatched`; (0, 0) if it is older
        than every table remembered (or none had come)."""
        for since, epoch, seq in reversed(self.history):
            if since <= dispatched:
                return epoch, seq
        return 0, 0

    def take(self, backend: int, cls: int, latency: float, ok: bool, now: float | None = None) -> None:
        self.countdown = self._next()
        if len(self.samples) < MAX_TRACES:
            epoch, seq = self.stamp((self.clock() if now is None else now) - latency)
            if seq:
                self.samples.append(m.TraceSample(epoch, seq, backend, cls, latency, ok))

    def drain(self) -> list[m.TraceSample]:
        s = self.samples
        self.samples = []
        return s


def build_stats(backends, class_names, *, slot: int, pid: int, generation: int, seq: int,
                ts: float, counters: dict, strategy, traces=(), copy: bool = True) -> m.WorkerStats:
    """The report of one worker (also used by the simulator, which has no sockets).

    With `copy=False` the report shares the backends' live counter lists: only
    for a caller that encodes it at once (the worker), never for one that keeps
    the struct (the simulator hands it to an Engine).  Copying them is most of
    the cost at scale: 256 backends x 8 classes hold 2,048 histograms."""
    if copy:
        bstats = [
            m.BackendStats(
                b.name, b.weight, b.requests, list(b.responses), b.connect_errors, b.timeouts,
                b.retries, b.resets, b.inflight, len(b.pool.idle) if b.pool is not None else 0,
                b.ewma, list(b.cls_responses), list(b.cls_errors), list(b.cls_lat_sum),
                [list(h) for h in b.cls_hist],
                not b.available, b.ramp, b.ejections, b.overflows,
            )
            for b in backends
        ]
    else:
        bstats = [
            m.BackendStats(
                b.name, b.weight, b.requests, b.responses, b.connect_errors, b.timeouts,
                b.retries, b.resets, b.inflight, len(b.pool.idle) if b.pool is not None else 0,
                b.ewma, b.cls_responses, b.cls_errors, b.cls_lat_sum, b.cls_hist,
                not b.available, b.ramp, b.ejections, b.overflows,
            )
            for b in backends
        ]
    for bs, b in zip(bstats, backends):
        sent = b.sent
        if sent:
            bs.sends = sent.tobytes()
            del sent[:]
        if b.sent_lost:
            bs.sends_lost, b.sent_lost = True, False
    mode = reason = ""
    table_seq = 0
    table_age = -1.0
    if isinstance(strategy, TableStrategy):
        mode = "learned" if strategy.learned else "fallback"
        reason = strategy.reason
        if strategy.table is not None:
            table_seq = strategy.table.seq
            table_age = max(0.0, ts - strategy.table.ts)
    return m.WorkerStats(
        slot=slot, pid=pid, generation=generation, seq=seq, ts=ts,
        classes=list(class_names), backends=bstats,
        strategy=strategy.name, mode=mode, mode_reason=reason,
        table_seq=table_seq, table_age=table_age, traces=list(traces), **counters,
    )


class Telemetry:
    def __init__(self, worker, runtime_dir: str, generation: int) -> None:
        self.worker = worker
        cfg = worker.cfg
        self.generation = generation
        self.interval = cfg.learning.stats_interval
        self.class_names = cfg.class_names
        self.seq = 0
        self.pid = os.getpid()
        ep = m.endpoints(runtime_dir)
        self.ctx = zmq.Context()
        pub = self.pub = self.ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 16)
        pub.connect(ep["stats_inference"])
        pub.connect(ep["stats_admin"])
        self.tables = Subscriber(self.ctx, ep["tables"], ep["tables_snapshot"],
                                 m.TOPIC_TABLE, m.decode_table_arrays)
        self.control = Subscriber(self.ctx, ep["control"], ep["control_snapshot"],
                                  m.TOPIC_CONTROL, m.control_decoder.decode)
        self.tracer = None
        if cfg.learning.trace_sample > 0:
            self.tracer = Tracer(cfg.learning.trace_sample, seed=cfg.balancer.seed + worker.slot)
            for b in worker.backends:
                b.tracer = self.tracer
        self.steer = Steering(worker, self.tables)
        self.loop = None
        self.timer = None
        self.closed = False

    def start(self, loop) -> None:
        self.loop = loop
        for sub in (self.tables, self.control):
            for fd in sub.fds():
                loop.add_reader(fd, self.poll)
        self.timer = loop.call_later(self.interval, self._tick)

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.loop is not None:
            for sub in (self.tables, self.control):
                for fd in sub.fds():
                    self.loop.remove_reader(fd)
        try:
            self.send()  # the last counters, so totals include this worker's final requests
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        self.tables.close()
        self.control.close()
        self.pub.close()
        self.ctx.term()

    # -- in -------------------------------------------------------------------

    def poll(self) -> None:
        if self.closed:
            return
        if self.control.poll():
            self.steer.apply(self.control.state)
        if self.tables.poll():
            table = self.tables.state
            if self.tracer is not None:
                self.tracer.install(table.epoch, table.seq)
            self.steer.set_table(table)

    async def fleet_ready(self, timeout: float) -> None:
        """Until the admin's fleet has been applied (or `timeout` seconds)."""
        self.poll()
        steer = self.steer
        if steer.fleet is not None:
            return
        steer.fleet_waiter = self.loop.create_future()
        try:
            await asyncio.wait_for(steer.fleet_waiter, timeout)
        except asyncio.TimeoutError:
            log("fleet_wait_timeout", slot=self.worker.slot, seconds=timeout)
        finally:
            steer.fleet_waiter = None

    # -- out ------------------------------------------------------------------

    def _tick(self) -> None:
        if self.closed:
            return
        try:
            self.poll()
            self.steer.check_mode()
            self.send()
        finally:
            self.timer = self.loop.call_later(self.interval, self._tick)

    def send(self) -> None:
        w = self.worker
        self.seq += 1
        counters = {
            "connections": len(w.conns), "accepted": w.accepted, "requests": w.requests,
            "rejected": w.rejected, "timeouts": w.timeouts, "no_backend": w.no_backend,
            "shed": w.shed, "limited": w.limited, "panic": w.health.panic,
            "proxy_errors": w.proxy_errors, "abandoned": w.abandoned,
        }
        if w.tls_ctx is not None:
            from lb.core.tls import HANDSHAKES

            counters["tls_handshakes"] = HANDSHAKES.ok
            counters["tls_failures"] = dict(HANDSHAKES.failed)
        stats = build_stats(
            w.backends, self.class_names, slot=w.slot, pid=self.pid, generation=self.generation,
            seq=self.seq, ts=time.time(), counters=counters, strategy=w.strategy,
            traces=self.tracer.drain() if self.tracer is not None else (), copy=False,
        )
        try:
            self.pub.send_multipart((m.TOPIC_STATS, m.encode(stats)), zmq.NOBLOCK)
        except zmq.Again:
            pass
