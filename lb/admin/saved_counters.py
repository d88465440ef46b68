"""The aggregated counters, kept in the runtime directory across admin restarts.

The admin process sums the workers' cumulative counters and folds those of
retired or dead workers into a base (lb/admin/stats.py).  That base lives in
memory: an admin process that crashed and was replaced would start from the
live workers' counts alone, and every counter of /metrics would fall back,
which Prometheus reads as a reset (a spurious `rate()` spike).  So the
base and the last report of every worker pid are written to a file in the
runtime directory (at most once a second, and before /metrics answers), and
a new admin process of the same supervisor starts from them.

The file names the supervisor's pid: a new lb run (same `runtime_dir`, new
supervisor) starts its counters from zero like any new process.
"""

from __future__ import annotations

import os
import time

import msgspec

from lb.core import log
from lb.core.messages import WorkerStats

from .stats import LIVE_FOR, Aggregator, Totals

STATE_FILE = "admin-counters.msgpack"


class Saved(msgspec.Struct):
    supervisor: int
    base: Totals
    workers: list[WorkerStats]  # the last report of every pid not yet folded into base


class CounterStore:
    def __init__(self, runtime_dir: str, supervisor: int) -> None:
        self.path = os.path.join(runtime_dir, STATE_FILE)
        self.supervisor = supervisor
        self.saved_at_message = -1  # Aggregator.messages at the last save

    def load(self, agg: Aggregator) -> None:
        """Start `agg` from what an earlier admin process of this supervisor saved."""
        try:
            with open(self.path, "rb") as f:
                saved = msgspec.msgpack.decode(f.read(), type=Saved)
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.log("admin_counters_unreadable", path=self.path, error=str(exc))
            return
        if saved.supervisor != self.supervisor:
            return  # another lb run's counters
        agg.base = saved.base
        # Heard "long enough ago" not to count as live in the gauges, but kept in
        # the totals until the worker reports again (same pid, higher seq) or is
        # retired like any silent one.
        heard = time.monotonic() - LIVE_FOR - 1.0
        for ws in saved.workers:
            agg.live[ws.pid] = (heard, ws)
            for b in ws.backends:
                if b.name not in agg.order:
                    agg.order.append(b.name)
        agg._cache = None
        log.log("admin_counters_loaded", workers=len(saved.workers))

    def save(self, agg: Aggregator) -> None:
        """Write the counters if a report arrived since the last save."""
        if agg.messages == self.saved_at_message:
            return
        workers = [msgspec.structs.replace(ws, traces=[]) for _, ws in agg.live.values()]
        blob = msgspec.msgpack.encode(Saved(self.supervisor, agg.base, workers))
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.log("admin_counters_write_failed", path=self.path, error=str(exc))
            return
        self.saved_at_message = agg.messages
