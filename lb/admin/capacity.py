"""`GET /api/capacity` and the fleet gauges: capacity, load, forecast, advice.

* Capacity per backend (lb/capacity.py) from its load curve as the whole
  instance loads it (lb/admin/loadcurves.py, from every worker's answers,
  whatever the strategy): the slot count, the service time per class
  weighted by the class mix it answered and the spread of the service times
  (from the curve's robust log statistics; before they are known, the
  p99/p50 ratio of the latency over the last WINDOW seconds).  Known (not a
  lower bound) when the curve saw it queue within the last WINDOW seconds.
* The load now (LOAD_WINDOW seconds) and its forecast: the per-minute
  history (lb/admin/loadhistory.py) fitted once a minute (lb/forecast.py,
  statsmodels) in a thread, off the event loop that serves the API.
* The fleet's capacity: its routable backends' slots pooled, as a balancer
  that sends each request where it waits least pools them, or their
  capacities summed if that is more (lb/capacity.py, `fleet_capacity`).
* The recommendation: routable backends needed so that the forecast's high
  end (or the load now, if higher) plus `capacity.headroom` stays under the
  fleet's capacity, at the mean capacity of the backends routable now.
"""

from __future__ import annotations

import asyncio
import math
import time

from lb.core import log
from lb.capacity import Estimate, estimate, fleet_capacity
from lb.forecast import Forecast, forecast

from .loadcurves import InstanceCurves
from .stats import quantile

REFIT = 60.0  # seconds between two forecasts
LOAD_WINDOW = 10.0  # seconds the current load is averaged over
WINDOW = 60.0  # seconds of latency (p99/p50) and of queueing evidence


class CapacityView:
    def __init__(self, state) -> None:
        self.state = state
        self.latest = Forecast("none", [], 0, "no forecast yet")
        self.fitted_at = 0.0
        self.curves = InstanceCurves()  # the backends' curves from every worker's answers

    def offer(self, ws) -> None:
        """Every worker stats report, as it comes."""
        self.curves.offer(ws)

    def update(self, now: float | None = None) -> None:
        """Once a second (AdminState.tick): learn from the answers reported."""
        self.curves.forget({b.name for b in self.state.fleet.backends()})
        self.curves.fold(now)

    def backends(self, now: float | None = None) -> dict[str, Estimate]:
        now = time.monotonic() if now is None else now
        slo = self.state.cfg.capacity.slo_p99_ms / 1000.0
        mix: dict[str, list[int]] = {}  # name -> answers per class, over every worker
        for ws in self.state.agg.live_workers():
            for b in ws.backends:
                acc = mix.setdefault(b.name, [0] * len(b.class_responses))
                for c, n in enumerate(b.class_responses[:len(acc)]):
                    acc[c] += n
        w = self.state.agg.window(WINDOW)
        out = {}
        for name in [b.name for b in self.state.fleet.backends()]:  # (not those removed since)
            got = self.curves.summary(name)
            if got is None:
                continue
            slots, service, sigma, _ = got
            weights = mix.get(name) or [1] * len(service)
            pairs = [(s, n) for s, n in zip(service, weights) if s > 0 and n > 0]
            if not pairs:
                pairs = [(s, 1) for s in service if s > 0]
            mean = sum(s * n for s, n in pairs) / sum(n for _, n in pairs)
            ratio = 1.0
            if sigma > 0:  # the service's own spread (a lognormal's p99 / p50)
                ratio = math.exp(2.326 * sigma)
            elif w:  # else the latency's, queueing and all
                old, new = w
                cur = new.hist.get(name, [])
                before = old.hist.get(name) or [0] * len(cur)  # (none: not heard of yet then)
                h = [b - a for a, b in zip(before, cur)]
                p50, p99 = quantile(h, 0.5), quantile(h, 0.99)
                if p50 and p99:
                    ratio = p99 / p50
            known = now - self.curves.knee_at.get(name, -math.inf) <= WINDOW
            out[name] = estimate(slots, mean, ratio, slo, known)
        return out

    async def run(self) -> None:
        """Refit every REFIT seconds (the first one at once)."""
        loop = asyncio.get_running_loop()
        while True:
            series = self.state.load.series()
            try:
                self.latest = await loop.run_in_executor(None, forecast, series)
                self.fitted_at = time.time()
            except Exception as exc:  # noqa: BLE001 - a model that fails keeps the last forecast
                log.log("forecast_failed", error=f"{type(exc).__name__}: {exc}", minutes=len(series))
            await asyncio.sleep(REFIT)

    def load_rps(self) -> float:
        w = self.state.agg.window(LOAD_WINDOW)
        if not w:
            return 0.0
        old, new = w
        dt = new.mono - old.mono
        return max(0.0, (new.workers.get("requests", 0) - old.workers.get("requests", 0)) / dt) if dt > 0 else 0.0

    def view(self) -> dict:
        f = self.latest
        load = self.load_rps()
        per = self.backends()
        routable = [n for n in self.state.routable() if n in per]
        fleet: dict = {"load_rps": round(load, 3), "capacity_rps": None, "headroom": None,
                       "recommended_backends": None, "routable_backends": len(self.state.routable()),
                       "known": None, "slo_p99_ms": self.state.cfg.capacity.slo_p99_ms,
                       "explore": self.state.cfg.capacity.explore}
        if routable:
            cap = fleet_capacity([per[n] for n in routable], self.state.cfg.capacity.slo_p99_ms / 1000.0)
            fleet["capacity_rps"] = round(cap, 3)
            fleet["known"] = all(per[n].known for n in routable) and len(routable) == fleet["routable_backends"]
            if load > 0:
                fleet["headroom"] = round(cap / load - 1.0, 4)
            high = max([load] + [p.high for p in f.points])
            mean = cap / len(routable)
            if mean > 0:
                need = high * (1.0 + self.state.cfg.capacity.headroom) / mean
                fleet["recommended_backends"] = max(1, math.ceil(need - 1e-9))
        return {
            "fleet": fleet,
            "backends": {n: e.as_dict() for n, e in per.items()},
            "forecast": [p.as_dict() for p in f.points],
            "forecast_method": f.method,
            "forecast_reason": f.reason,
            "forecast_at": round(self.fitted_at, 3) if self.fitted_at else None,
            "history_minutes": len(self.state.load.rates),
        }
