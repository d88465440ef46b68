"""What the workers' strategy would pick now, computed by the workers' own code.

`POST /api/route` used to re-implement every strategy here, and the copies
drifted (P2C and least-connections ignored weights; `ml` was explained as a
pick by weight while workers compare costs).  Now the admin builds the
workers' own `Backend` objects from the state the workers report (mean
in-flight per live worker, mean peak EWMA, configured weight, drained, down
or ejected), makes the strategy with the workers' `make_strategy`, gives an
`ml` strategy the current table, and lets it pick `PICKS` times: the share
of picks each backend gets is what one worker in that state would do.

What is not modelled: per-worker differences (each worker sees only its own
in-flight requests), slow start and circuit breakers (applied after the pick,
workers/dispatch.py), and the state a strategy carries between picks (round
robin's position, smooth WRR's counters: a fresh one starts at the top).
"""

from __future__ import annotations

import time

from lb.core.config import Backend as BackendConfig
from lb.core.messages import Table

from workers.backend import DEFAULT_RTT, Backend
from workers.strategies import make_strategy

PICKS = 4000
SEED = 1  # fixed: the same state explains the same way


class BackendState:
    """One backend as the admin sees it, averaged over the live workers."""

    __slots__ = ("name", "weight", "inflight", "ewma", "excluded")

    def __init__(self, name: str, weight: int, inflight: float, ewma: float, excluded: str | None) -> None:
        self.name = name
        self.weight = weight
        self.inflight = inflight  # per worker
        self.ewma = ewma if ewma > 0 else DEFAULT_RTT  # no report yet: the workers' prior
        self.excluded = excluded  # None, "drained", "down", "ejected" or "weight 0"


RULES = {
    "round_robin": "round_robin: every routable backend in turn, one request each",
    "weighted_round_robin": "weighted_round_robin (smooth, as nginx): every routable backend in turn, "
                            "in proportion to its configured weight",
    "least_connections": "least_connections: the fewest (in-flight + 1) / weight, ties in turn",
    "random": "random: a random backend, in proportion to its configured weight",
    "p2c_ewma": "p2c_ewma: of two random backends the lower ewma x (inflight+1) / weight wins",
    "prequal": "prequal: among candidates whose in-flight / weight is below the recent 80th percentile "
               "(cold), the lowest peak EWMA; if all are hot, the fewest in flight / weight",
}


def simulate(strategy_name: str, states: list[BackendState], cls_index: int, class_names: list[str],
             table: Table | None, decay: float) -> tuple[dict[str, float], object]:
    """(share of `PICKS` picks per backend, the strategy object after them)."""
    backends = []
    for i, st in enumerate(states):
        b = Backend(BackendConfig(address="127.0.0.1:9", weight=max(st.weight, 0), name=st.name),
                    len(class_names), i)
        b.inflight = st.inflight
        b.ewma = st.ewma
        b.available = st.excluded is None
        backends.append(b)
    strategy = make_strategy(strategy_name, backends, decay=decay, seed=SEED, class_names=class_names)
    if table is not None and hasattr(strategy, "set_table"):
        strategy.set_table(table)
        strategy.check(time.time())
    for b in backends:
        if getattr(b, "curve", None) is not None:
            # what is in flight, at the backend's peak EWMA each (the workers'
            # curves and the classes in flight are not reported)
            b.curve.work = b.inflight * b.ewma
    counts = dict.fromkeys((b.name for b in backends), 0)
    for _ in range(PICKS):
        b = strategy.pick((), cls_index)
        if b is not None:
            counts[b.name] += 1
    return {n: round(c / PICKS, 4) for n, c in counts.items() if c}, strategy


def explain(strategy_name: str, cls: str, class_names: list[str], states: list[BackendState],
            table: Table | None, mode: str, reason: str, decay: float) -> dict:
    """Which backend the strategy in force would most likely pick now, and why."""
    live = [s for s in states if s.excluded is None]
    out: dict = {"strategy": strategy_name,
                 "excluded": {s.name: s.excluded for s in states if s.excluded is not None}}
    if not live:
        out.update(backend=None, why="no routable backend: lb answers 503")
        return out
    cls_index = class_names.index(cls) if cls in class_names else 0
    learned = strategy_name == "ml" and mode == "learned" and table is not None
    shares, strategy = simulate(strategy_name, states, cls_index, class_names, table if learned else None, decay)
    best = max(shares, key=shares.__getitem__) if shares else None
    out.update(backend=best, pick_shares=shares)
    if strategy_name == "ml":
        out["mode"] = mode
        out["mode_reason"] = reason
        if learned and getattr(strategy, "learned", False):
            out.update(_learned(strategy, table, cls, live, best, shares))
            return out
        why = reason or getattr(strategy, "reason", "") or "no usable table"
        out.update(_p2c(live, best), why_fallback=why)
        out["why"] = f"fallback ({why}): " + out["why"]
        return out
    if strategy_name in ("p2c_ewma",):
        out.update(_p2c(live, best))
        return out
    total = sum(s.weight for s in live)
    if strategy_name in ("weighted_round_robin", "random"):
        out["weights"] = {s.name: round(s.weight / total, 4) for s in live}
    elif strategy_name == "round_robin":
        out["weights"] = {s.name: round(1 / len(live), 4) for s in live}
    elif strategy_name == "least_connections":
        out["inflight"] = {s.name: round(s.inflight, 3) for s in live}
        out["loads"] = {s.name: round((s.inflight + 1) / s.weight, 4) for s in live}
    elif strategy_name == "prequal":
        out["inflight"] = {s.name: round(s.inflight, 3) for s in live}
        out["ewma"] = {s.name: round(s.ewma, 6) for s in live}
    rule = RULES.get(strategy_name, strategy_name)
    if len(shares) > 1 and max(shares.values()) - min(shares.values()) < 0.02:
        out["why"] = f"{rule}; {len(shares)} backends get an equal share of picks now"
    else:
        out["why"] = f"{rule}; {best} gets the most picks now ({shares[best]:.0%})"
    return out


def _p2c(live: list[BackendState], best: str | None) -> dict:
    scores = {s.name: s.ewma * (s.inflight + 1) / s.weight for s in live}
    low = min(scores.values())
    lowest = [n for n, v in scores.items() if v == low]
    if len(lowest) == 1:
        now = f"lowest now: {lowest[0]} ({low:.6f}), which wins every pair it is in"
    else:
        now = f"tied lowest now: {', '.join(lowest)} ({low:.6f}); {best} gets the most picks"
    return {"scores": {n: round(v, 6) for n, v in scores.items()}, "why": f"{RULES['p2c_ewma']}; {now}"}


def _learned(strategy, table: Table, cls: str, live: list[BackendState], best: str, shares: dict) -> dict:
    names = {s.name for s in live}
    row_i = table.classes.index(cls) if cls in table.classes else (
        table.classes.index("default") if "default" in table.classes else 0)
    row = table.weights[row_i] if row_i < len(table.weights) else []
    weights = {b: w for b, w in zip(table.backends, row) if b in names and w > 0}
    total = sum(weights.values()) or 1.0
    out = {"weights": {b: round(w / total, 4) for b, w in weights.items()},
           "table_seq": table.seq, "model_version": table.model_version,
           "exploration": round(strategy.explore, 4)}
    if table.cost and row_i < len(table.cost):
        out["costs"] = {b: round(c, 6) for b, c in zip(table.backends, table.cost[row_i]) if b in weights}
    rule = ("the least expected cost: answered, the backend's service time for the class (the table's "
            "predicted latency until the worker's own load curve has answers) plus, when its slots are "
            "full, the wait for the work in flight and the wait the request adds to those queued behind "
            "it; failed, a fixed cost (1 s, or less once clients give up sooner); weighed by the priced "
            "error (from the table's cost / latency), times the "
            "square of the worker's consecutive failures + 1, leaving out a backend whose expected "
            "latency is past 0.75 of how long the class's clients wait (each worker learns it from "
            "the clients that gave up) unless every one is, then the longest wins; the admin prices "
            "by the table, the mean in-flight counts and peak EWMAs, not by each worker's curves")
    explore = f"with probability {strategy.explore:.1%} a backend not heard from lately (exploration), " \
        "otherwise " if strategy.explore > 0 else ""
    out["why"] = (f"learned table seq {table.seq}, class {cls!r}: picked by cost: {explore}{rule}; "
                  f"{best} gets the most picks now ({shares[best]:.0%})")
    return out
