"""A worker applies the fleet the admin process publishes, in place, no reload.

The fleet (`lb.core.messages.FleetBackend`s in the `Control` state) is the whole
list of backends to route to: the config's, the ones DNS discovery found and
the ones added through the admin API (lb/admin/fleet.py).  Applying it:

* a backend that stays (same name, address, TLS and server name) keeps
  everything: its connections, counters, EWMA and load curve; its weight
  follows the fleet's;
* a new one starts as a backend of the config would (its own pool, this
  worker's share of the circuit breakers, outlier detection, the tracer) and
  ramps up through slow start;
* one that leaves is retired: no strategy sees it again, its idle
  connections close now and the ones held by requests still in flight close
  when those finish (its `Backend` object lives as long as they do).

Strategies are rebuilt over the new list (their per-backend state lives on
the `Backend`s, so nothing learned is lost) and the table in hand is
installed again.  Nothing here runs per request.
"""

from __future__ import annotations

from lb.core.log import log
from workers.backend import Backend
from workers.pool import Pool


def spec(b) -> tuple:
    """What makes a backend the same one: a change of any of these is a new backend."""
    return (b.name, b.address, b.tls, b.sni)


def apply(worker, fleet: list, ramp: bool = True) -> bool:
    """Make `worker.backends` the fleet's backends.  True if anything changed.
    New backends ramp up through slow start, unless `ramp` is False (the
    first fleet a starting worker gets: nothing has been routed yet)."""
    current = {b.name: b for b in worker.backends}
    specs = worker.backend_specs
    kept, added, removed, reweighed = [], [], [], 0
    new = []
    for fb in fleet:
        b = current.get(fb.name)
        if b is not None and specs.get(fb.name) == spec(fb):
            del current[fb.name]
            if b.weight != fb.weight:
                b.weight = fb.weight
                reweighed += 1
            kept.append(b)
        else:
            b = make_backend(worker, fb, len(new))
            added.append(b)
        new.append(b)
    removed = list(current.values())
    if not added and not removed and not reweighed and [b.name for b in worker.backends] == [b.name for b in new]:
        return False
    for b in removed:
        retire(b)
        specs.pop(b.name, None)
    for i, b in enumerate(new):
        b.idx = i
    for fb in fleet:
        specs[fb.name] = spec(fb)
    worker.backends[:] = new  # in place: the health state and the telemetry hold this list
    if worker.telemetry is not None and worker.telemetry.tracer is not None:
        worker.telemetry.tracer.drain()  # samples name backends by index: the old indexes go
    worker.rebuild_strategy()
    worker.health.fleet_changed(added, removed, ramp)
    log("fleet_applied", slot=worker.slot, backends=len(new), added=[b.name for b in added],
        removed=[b.name for b in removed], reweighed=reweighed)
    return True


def make_backend(worker, fb, idx: int) -> Backend:
    b = Backend(fb, len(worker.cfg.class_names), idx)
    b.max_conns = worker.backend_max_conns
    b.max_pending = worker.backend_max_pending
    if worker.telemetry is not None:
        b.tracer = worker.telemetry.tracer
    if worker.loop is not None:
        b.pool = worker.make_pool(b, fb)
    return b


def retire(b: Backend) -> None:
    b.available = False
    b.weight = 0
    pool: Pool | None = b.pool
    if pool is None:
        return
    pool.max_idle = 0  # connections released from now on close
    for conn in pool.idle:
        conn.alive = False
        conn.transport.close()
    pool.idle.clear()
