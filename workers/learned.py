"""The learned policy's pick (`ml`): the inference process's tables, checked by a guard.

The worker receives versioned tables over ZeroMQ (workers/telemetry.py) and
installs each with `set_table`; `check` decides every stats tick whether the
table may route; `pick` routes by it.  Everything is local to the worker.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

from workers.balancer import Backend, P2CEwma
from workers.guard import CONTROL, LEARNED, Guard

NO_ARM = -1  # a pick the guard does not judge (a retry, no usable table)


class TableStrategy(P2CEwma):
    """Routes by the inference process's tables (the `ml` strategy).

    A table (`lb.messages.Table`) holds, per request class, a weight for every
    backend (where traffic should go) and the model's expected cost of a
    request there (predicted latency, penalised by predicted error).  A pick:

    * with probability `table.exploration`, one uniform draw over the class's
      backends (every backend the table routes to keeps producing data);
    * otherwise two weighted draws from the class's row, and the one with the
      lower   cost x (in-flight + 1) / (ref in-flight + 1)
                   x peak EWMA / ref peak EWMA x (consecutive failures + 1)
      wins, where "ref" is this worker's state when the tables came (smoothed
      over the last few).  The model supplies what one worker cannot see
      (per-class cost, error probability, capacity, load from every worker);
      the worker supplies what the model cannot know yet: requests it sent
      since, a backend that just turned slow (peak EWMA jumps at once) or
      started failing.  In steady state the live terms are ~1 and the model's
      cost decides.

    A table without costs (older publishers) is compared by weight / (local
    in-flight + 1) instead.

    It falls back to P2C-EWMA (`learned` False, `reason` says why) when it has
    no table, when the table is older than twice its publish interval (the
    inference process is late or down), when the table itself says the
    model is not to be trusted (`mode == "fallback"`), or when the guard
    (workers/guard.py) finds the table's picks worse than P2C-EWMA's: a
    `guard_share` of the picks always goes by the other arm (P2C-EWMA while
    the table routes, the table while the guard holds it off), and `arm`
    says which arm made the last pick, for the outcome to be credited to it.
    """

    name = "ml"
    REF_KEEP = 0.5  # smoothing of the reference in-flight counts, per table

    def __init__(self, backends, *, class_names=("default",), guard_share: float = 0.0, **kw) -> None:
        super().__init__(backends, **kw)
        self.class_names = list(class_names)
        self.table = None
        self.learned = False  # the table routes (the guard's minority share aside)
        self.usable = False  # the table may route (fresh, trusted); the guard may still hold it off
        self.reason = "no_table"
        self.guard = Guard(guard_share) if guard_share > 0 else None
        self.arm = NO_ARM  # which arm made the last pick (guard.LEARNED / CONTROL / NO_ARM)
        self.stale_after = 0.0
        self.explore = 0.0
        # per backend idx: this worker's in-flight and peak EWMA when tables came (smoothed)
        self._ref = [0.0] * len(backends)
        self._ewma_ref = [0.0] * len(backends)
        # per local class: (candidates, cumulative weights, scaled cost by backend idx or
        # None, total weight, weight by backend idx)
        self._rows: list[tuple[list[Backend], list[float], list[float] | None, float, list[float]]] = []
        self._cols_for: list[str] | None = None  # the table backend list `_cols` was built for
        self._cols: list[int] = []  # table column of each backend (by idx), -1 if absent

    def set_table(self, table) -> None:
        self.table = table
        self.stale_after = table.ts + 2 * table.interval
        self.explore = table.exploration if table.cost else 0.0
        # this worker's in-flight and peak EWMA per backend, smoothed over tables: the
        # state the table's costs correspond to, so the pick scales a cost by how
        # far the backend has moved from it since
        keep = self.REF_KEEP
        ref, eref = self._ref, self._ewma_ref
        for b in self.backends:
            i = b.idx
            ref[i] = keep * ref[i] + (1.0 - keep) * b.inflight
            eref[i] = keep * eref[i] + (1.0 - keep) * b.ewma if eref[i] > 0 else b.ewma
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the per-class rows (new table, or backend availability changed).

        Runs once per table (every `learning.interval`) on the worker's event
        loop: column lookups are cached while the table's backend list stays the
        same, and each row is one comprehension (256 backends x 8 classes in
        well under a millisecond; bench/inference_bench.py measures it)."""
        table = self.table
        if table is None:
            self._rows = []
            return
        if table.backends != self._cols_for:
            col = {name: i for i, name in enumerate(table.backends)}
            self._cols = [col.get(b.name, -1) for b in self.backends]
            self._cols_for = table.backends
        # the table's column of each backend (by idx), -1 if absent or unavailable
        cols = [c if b.available else -1 for b, c in zip(self.backends, self._cols)]
        rows_by_name = dict(zip(table.classes, table.weights))
        default = rows_by_name.get("default") or (table.weights[0] if table.weights else [])
        costs_by_name = dict(zip(table.classes, table.cost)) if table.cost else {}
        default_cost = costs_by_name.get("default") or (table.cost[0] if table.cost else None)
        # cost / reference state: the reference in-flight and peak EWMA, by backend idx
        denom = [(r + 1.0) * max(e, 1e-6) for r, e in zip(self._ref, self._ewma_ref)]
        backends = self.backends
        rows = []
        for cname in self.class_names:
            trow = rows_by_name.get(cname, default)
            crow = costs_by_name.get(cname, default_cost)
            nt = len(trow)
            weight = [trow[c] if 0 <= c < nt else 0.0 for c in cols]
            cands = [b for b, w in zip(backends, weight) if w > 0]
            scaled = None  # no costs (an older publisher): compare by weight
            if crow is not None:
                nc = min(len(crow), nt)
                if all(cols[b.idx] < nc for b in cands):
                    scaled = [max(crow[c], 1e-9) / d if 0 <= c < nc else -1.0
                              for c, d in zip(cols, denom)]
            cum = list(accumulate(weight[b.idx] for b in cands))
            rows.append((cands, cum, scaled, cum[-1] if cum else 0.0, weight))
        self._rows = rows

    def check(self, now: float) -> tuple[bool, str]:
        """Decide the mode from the table held at wall-clock `now`."""
        table = self.table
        if table is None:
            learned, reason = False, "no_table"
        elif now > self.stale_after:
            learned, reason = False, "stale"
        elif table.mode != "learned":
            learned, reason = False, table.reason or "inference_fallback"
        elif not any(r[0] for r in self._rows):
            learned, reason = False, "no_weights"
        else:
            learned, reason = True, ""
        self.usable = learned
        if learned and self.guard is not None and not self.guard.tick(now):
            learned, reason = False, "guard"
        self.learned = learned
        self.reason = reason
        return learned, reason

    def pick(self, exclude=(), cls=0):
        if exclude or not self.usable:  # a retry, or no table to route by
            self.arm = NO_ARM
            return super().pick(exclude)
        g = self.guard
        if g is not None:
            # the minority arm: P2C-EWMA while the table routes, the table while
            # the guard holds it off
            minority = self.rng.random() < g.share
            if minority == self.learned:
                self.arm = CONTROL
                return super().pick(exclude)
            self.arm = LEARNED
        elif not self.learned:
            return super().pick(exclude)
        return self._table_pick(cls)

    def _table_pick(self, cls: int):
        cands, cum, scaled, top, weight = self._rows[cls]
        if not cands:
            return super().pick(())
        rnd = self.rng.random
        r = rnd()
        explore = self.explore
        if r < explore:
            return cands[int(r / explore * len(cands))]
        # r is uniform on [explore, 1): reused for the first draw
        a = cands[bisect_right(cum, (r - explore) / (1.0 - explore) * top)]
        b = cands[bisect_right(cum, rnd() * top)]
        if a is b:
            return a
        if scaled is None:
            return a if weight[a.idx] / (a.inflight + 1) >= weight[b.idx] / (b.inflight + 1) else b
        # cost x (in-flight + 1) x peak EWMA x (consecutive failures + 1), the first
        # two relative to the state when the table came (folded into `scaled`)
        if (scaled[a.idx] * (a.inflight + 1) * a.ewma * (a.failures + 1)
                <= scaled[b.idx] * (b.inflight + 1) * b.ewma * (b.failures + 1)):
            return a
        return b
