"""Which backends a worker routes to, and how much.

A backend is routable unless an operator drained it or its weight is 0.  A
routable backend is healthy unless the active health checks say it is down
(shared by the admin process in the control state) or this worker ejected it
after consecutive failures of real requests (passive outlier detection).
Strategies pick among `available` backends, which are the healthy ones, or in
panic mode (too few healthy) all routable ones: better to try a backend that
may be bad than to answer 503 to everyone.

A backend that becomes available again after being out ramps up over
`balancer.slow_start` seconds: `ramp` grows from 0.05 to 1, and a pick that
lands on it is kept with that probability (workers/dispatch.py), so its share
grows with the ramp whatever the strategy.
"""

from __future__ import annotations

import time

from lb.core.log import log

NEVER = 1 << 62
RAMP_FLOOR = 0.05


class HealthState:
    def __init__(self, worker) -> None:
        cfg = worker.cfg
        self.worker = worker
        self.backends = worker.backends
        o = cfg.outlier
        self.threshold = o.consecutive_failures or NEVER
        self.base = o.base_ejection
        self.cap = o.max_ejection
        self.max_ejected = o.max_ejected_percent
        self.slow_start = cfg.balancer.slow_start
        self.panic_threshold = cfg.balancer.panic_threshold
        self.drained: frozenset[str] = frozenset()
        self.down: frozenset[str] = frozenset()
        self.ejected_until: dict[str, float] = {}
        self.streak: dict[str, int] = {}  # ejections in a row (the next one lasts longer)
        self.clean_since: dict[str, float] = {}  # back since (resets the streak after a while)
        self.since: dict[str, float] = {}  # available again since (slow start)
        self.panic = False
        for b in self.backends:
            b.eject_after = self.threshold
            b.on_outlier = self.eject

    # -- inputs -----------------------------------------------------------------

    def set_control(self, drained, down) -> None:
        drained, down = frozenset(drained), frozenset(down)
        if (drained, down) != (self.drained, self.down):
            for name in sorted(down - self.down):
                log("backend_down", slot=self.worker.slot, backend=name, source="health_check")
            for name in sorted(self.down - down):
                log("backend_up", slot=self.worker.slot, backend=name, source="health_check")
                # Passing active checks again also ends a passive ejection
                # (it was most likely caused by the same outage).
                if self.ejected_until.pop(name, None) is not None:
                    self.streak.pop(name, None)
            self.drained, self.down = drained, down
            self.recompute(time.monotonic())

    def fleet_changed(self, added, removed, ramp: bool) -> None:
        """Backends joined or left the fleet (workers/fleet.py)."""
        for b in added:
            b.eject_after = self.threshold
            b.on_outlier = self.eject
            if ramp:
                b.available = False  # so that recompute starts its slow start
        for b in removed:
            for state in (self.ejected_until, self.streak, self.clean_since, self.since):
                state.pop(b.name, None)
        self.recompute(time.monotonic())

    def eject(self, backend) -> None:
        """Called by `Backend.record` after `eject_after` failures in a row."""
        backend.failures = 0
        name = backend.name
        if name in self.ejected_until or not backend.available:
            return
        n = len(self.backends)
        if (len(self.ejected_until) + 1) * 100 > self.max_ejected * n:
            log("ejection_skipped", slot=self.worker.slot, backend=name,
                reason="max_ejected_percent", ejected=len(self.ejected_until))
            return
        now = time.monotonic()
        k = self.streak[name] = self.streak.get(name, 0) + 1
        seconds = min(self.cap, self.base * k)
        self.ejected_until[name] = now + seconds
        self.clean_since.pop(name, None)
        backend.ejections += 1
        log("backend_ejected", slot=self.worker.slot, backend=name, seconds=seconds,
            consecutive_failures=self.threshold, streak=k)
        self.recompute(now)

    # -- periodic ---------------------------------------------------------------

    def sweep(self, now: float) -> None:
        changed = False
        for name, until in list(self.ejected_until.items()):
            if now >= until:
                del self.ejected_until[name]
                self.clean_since[name] = now
                log("backend_returned", slot=self.worker.slot, backend=name)
                changed = True
        for name, t in list(self.clean_since.items()):
            if now - t > self.cap:  # a long clean run forgets the streak
                del self.clean_since[name]
                self.streak.pop(name, None)
        if changed:
            self.recompute(now)
        if self.since:
            self.update_ramps(now)

    def update_ramps(self, now: float) -> None:
        window = self.slow_start
        for b in self.backends:
            t = self.since.get(b.name)
            if t is None:
                continue
            r = (now - t) / window if window else 1.0
            if r >= 1.0:
                b.ramp = 1.0
                del self.since[b.name]
            else:
                b.ramp = max(RAMP_FLOOR, r)

    # -- the decision -------------------------------------------------------------

    def recompute(self, now: float) -> None:
        routable = [b for b in self.backends if b.weight > 0 and b.name not in self.drained]
        healthy = [b for b in routable
                   if b.name not in self.down and b.name not in self.ejected_until]
        panic = bool(routable) and len(healthy) * 100 < self.panic_threshold * len(routable)
        use = set(map(id, routable if panic else healthy))
        for b in self.backends:
            avail = id(b) in use
            if avail and not b.available and self.slow_start > 0:
                self.since[b.name] = now
                b.ramp = RAMP_FLOOR
            elif not avail:
                self.since.pop(b.name, None)
                b.ramp = 1.0
            b.available = avail
        if panic != self.panic:
            self.panic = panic
            log("panic_mode", slot=self.worker.slot, on=panic, healthy=len(healthy),
                routable=len(routable))
        self.worker.strategy.refresh()
