"""What the control state and the tables change in a worker.

The admin process's `Control` (the fleet beyond the config file, operator
drains, health verdicts, a pinned strategy) and the inference process's
`Table` arrive through workers/telemetry.py; this module applies them: the
fleet in place (workers/fleet.py), drains and verdicts to the health state,
a pinned strategy by switching the worker's strategy, and a table to an `ml`
strategy, logging the routing mode (`policy_mode`) when it changes.
"""

from __future__ import annotations

import os
import time

from lb.core import messages as m
from lb.core.fleet import compose
from lb.core.log import log
from workers import fleet
from workers.learned import TableStrategy
from workers.strategies import STRATEGIES


class Steering:
    def __init__(self, worker, tables) -> None:
        self.worker = worker
        self.tables = tables  # the table subscriber: its latest table goes to a strategy made later
        self.pid = os.getpid()
        self.mode: tuple[bool, str] | None = None
        self.pinned = ""
        self.fleet: list[m.FleetBackend] | None = None  # the last fleet applied
        self.fleet_waiter = None  # an asyncio future while the worker waits for its first fleet

    def apply(self, control: m.Control) -> None:
        w = self.worker
        if control.fleet_known:
            backends = compose(w.cfg, control.discovered, control.added, control.shared)
            if backends != self.fleet:
                first, self.fleet = self.fleet is None, backends
                fleet.apply(w, backends, ramp=not first)
            if self.fleet_waiter is not None and not self.fleet_waiter.done():
                self.fleet_waiter.set_result(None)
        w.health.set_control(control.drained, control.down)
        pinned = control.pinned_strategy if control.pinned_strategy in STRATEGIES else ""
        if pinned != self.pinned:
            self.pinned = pinned
            self.switch_strategy(pinned or w.cfg.strategy)

    def switch_strategy(self, name: str) -> None:
        w = self.worker
        if w.strategy.name == name:
            return
        strategy = w.make_strategy(name)
        self.install_table(strategy)
        w.strategy = strategy
        log("strategy_switched", slot=w.slot, pid=self.pid, strategy=name,
            pinned=bool(self.pinned))
        self.mode = None
        self.check_mode()

    def install_table(self, strategy) -> None:
        if isinstance(strategy, TableStrategy) and self.tables.state is not None:
            strategy.set_table(self.tables.state)

    def check_mode(self) -> None:
        strategy = self.worker.strategy
        if not isinstance(strategy, TableStrategy):
            return
        mode = strategy.check(time.time())
        if mode != self.mode:
            self.mode = mode
            log("policy_mode", slot=self.worker.slot, pid=self.pid,
                mode="learned" if mode[0] else "fallback", reason=mode[1])

    def set_table(self, table: m.Table) -> None:
        strategy = self.worker.strategy
        if isinstance(strategy, TableStrategy):
            strategy.set_table(table)
            self.check_mode()
