"""JSON views of the admin state, shared by the API and the dashboard feed."""

from __future__ import annotations

import time

from .routing import table_view
from .state import AdminState
from .stats import Rates, Sample, rates

LIVE_WINDOW = 5.0  # seconds: /api/metrics rates and percentiles


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(x, nd)


def health(s: AdminState) -> tuple[int, dict]:
    st = s.status()
    routable = s.routable()
    problems = []
    if st is None:
        problems.append("no status from the supervisor")
    elif st.workers_ready != st.workers_expected:
        problems.append(f"{st.workers_ready} of {st.workers_expected} workers ready")
    if not routable:
        problems.append("no routable backend")
    ready = not problems
    body = {
        "status": "ready" if ready else "not_ready",
        "live": True,
        "ready": ready,
        "problems": problems,
        "workers_expected": st.workers_expected if st else None,
        "workers_ready": st.workers_ready if st else None,
        "workers_reporting": len(s.agg.live_workers()),
        "generation": st.generation if st else None,
        "inference_up": st.inference_up if st else None,
        "routable_backends": routable,
        "uptime": round(time.time() - s.started, 3),
    }
    return (200 if ready else 503), body


def backend_state(s: AdminState, name: str, weight: int, g=None) -> str:
    if name in s.control.drained:
        return "drained"
    if name in s.control.down:
        return "down"
    if weight <= 0:
        return "weight0"
    if g is not None:
        if g.unavailable.get(name, 0):
            return "ejected"  # by at least one worker's passive outlier detection
        if g.ramp.get(name, 1.0) < 1.0:
            return "slow start"
    return "up"


def backends(s: AdminState) -> list[dict]:
    g = s.agg.gauges()
    t = s.agg.totals()
    cfgw = s.config_weights()
    fleet = {b.name: b for b in s.fleet.backends()}
    out = []
    for n in s.backend_names():
        bt = t.backends.get(n)
        w = cfgw.get(n, 0)
        fb = fleet.get(n)
        out.append({
            "name": n,
            "address": fb.address if fb is not None else None,
            "source": fb.source if fb is not None else None,  # None: leaving (a reload or a removal)
            "state": backend_state(s, n, w, g),
            "drained": n in s.control.drained,
            "down": n in s.control.down,
            "config_weight": w,
            # the learned table's shares only when the ml strategy routes by it
            "table_weights": ({k: round(v, 6) for k, v in s.table_weight(n).items()}
                              if s.strategy() == "ml" else {}),
            "inflight": g.inflight.get(n, 0),
            "idle": g.idle.get(n, 0),
            "ewma": _r(g.ewma.get(n)),
            "requests": bt.requests if bt else 0,
            "errors": bt.errors() if bt else 0,
            "ejections": bt.ejections if bt else 0,
            "ejected_workers": g.unavailable.get(n, 0) if n not in s.control.drained else 0,
            "slow_start_ramp": round(g.ramp.get(n, 1.0), 3),
        })
    return out


def _rates_json(r: Rates | None) -> dict:
    if r is None:
        return {"rps": 0.0, "errors_per_s": 0.0, "error_ratio": 0.0, "share": 0.0, "p50": None, "p99": None}
    return {"rps": round(r.rps, 3), "errors_per_s": round(r.errors_per_s, 3),
            "error_ratio": round(r.error_ratio, 5), "share": round(r.share, 5),
            "p50": _r(r.p50), "p99": _r(r.p99)}


def live_metrics(s: AdminState, window: float = LIVE_WINDOW) -> dict:
    names = s.backend_names()
    w = s.agg.window(window)
    rs = rates(w[0], w[1], names) if w else {}
    eff = s.effective_weights()
    per = []
    for b in backends(s):
        n = b["name"]
        entry = {"name": n, "state": b["state"], "weight": round(eff.get(n, 0.0), 5),
                 "config_weight": b["config_weight"], "inflight": b["inflight"], "idle": b["idle"],
                 "ewma": b["ewma"], "requests": b["requests"], "errors": b["errors"]}
        entry.update(_rates_json(rs.get(n)))
        per.append(entry)
    totals = s.agg.totals().workers
    return {
        "ts": time.time(),
        "window": round(w[1].mono - w[0].mono, 3) if w else 0.0,
        "backends": per,
        "totals": dict(totals),
        "connections": s.agg.gauges().connections,
    }


def route(s: AdminState) -> dict:
    """The strategy in force and the state it picks by: the learned table and
    mode only for `ml`; for a classic strategy what it reads per backend."""
    mode, reason = s.mode()
    strategy = s.strategy()
    ml = strategy == "ml"
    return {
        "strategy": strategy,
        "config_strategy": s.config_strategy(),
        "pinned_strategy": s.control.pinned or None,
        "mode": mode if ml else None,
        "reason": reason if ml else None,
        "classes": s.cfg.class_names,
        "config_weights": s.config_weights(),
        "drained": s.control.drained,
        "picks_by": strategy_state(s, strategy),
        "table": table_view(s.table, s.tables.received) if ml else None,
    }


def strategy_state(s: AdminState, strategy: str) -> dict:
    """Per routable backend, what `strategy` reads to pick (as the workers run it)."""
    g = s.agg.gauges()
    workers = max(g.workers, 1)
    cfgw = s.config_weights()
    live = s.routable()
    total = sum(cfgw.get(n, 0) for n in live)
    out: dict = {"backends": live}
    if strategy == "round_robin":
        out["rule"] = "each routable backend in turn"
        out["shares"] = {n: round(1 / len(live), 4) for n in live} if live else {}
    elif strategy in ("weighted_round_robin", "random"):
        out["rule"] = ("in turn, in proportion to the configured weight (smooth WRR)"
                       if strategy == "weighted_round_robin" else "at random, in proportion to the configured weight")
        out["weights"] = {n: cfgw.get(n, 0) for n in live}
        out["shares"] = {n: round(cfgw.get(n, 0) / total, 4) for n in live} if total else {}
    elif strategy in ("least_connections", "prequal", "p2c_ewma") or (strategy == "ml" and s.mode()[0] != "learned"):
        out["rule"] = {
            "least_connections": "fewest (in-flight + 1) / weight",
            "prequal": "lowest peak EWMA among backends not hot by in-flight / weight, else fewest in flight",
        }.get(strategy, "of two random backends, the lower peak EWMA x (in-flight + 1) / weight")
        out["weights"] = {n: cfgw.get(n, 0) for n in live}
        out["inflight_per_worker"] = {n: round(g.inflight.get(n, 0) / workers, 3) for n in live}
        if strategy != "least_connections":
            out["ewma"] = {n: _r(g.ewma.get(n)) for n in live}
    else:  # ml, learned
        out["rule"] = ("the least expected cost: each worker's load curve of the backend (service time "
                       "per class, slots, work in flight, the wait a request adds to those queued behind "
                       "it) priced by the learned table (priced error, predicted latency of classes not "
                       "seen yet); a share explores backends not heard from lately")
    return out


def _point(old: Sample, new: Sample, names: list[str]) -> dict:
    rs = rates(old, new, names)
    weights = new.weights
    return {"ts": round(new.ts, 3),
            "b": {n: {"rps": round(r.rps, 3), "share": round(r.share, 4), "p50": _r(r.p50),
                      "p99": _r(r.p99), "err": round(r.errors_per_s, 3),
                      "w": round(weights.get(n, 0.0), 4)} for n, r in rs.items()}}


def history(s: AdminState) -> list[dict]:
    """One point per second over the kept history (weights as they are now)."""
    names = s.backend_names()
    h = list(s.agg.history)
    return [_point(a, b, names) for a, b in zip(h, h[1:])]


def tls(s: AdminState) -> dict | None:
    """The HTTPS listener: its certificates (expiry) and handshake counts; None without one."""
    cfg = s.cfg.tls
    if not cfg.listen:
        return None
    from lb.admin.stats import TLS_FAILED

    now = time.time()
    totals = s.agg.totals().workers
    certs = [{"cert": c.path, "names": c.names, "key_type": c.key_type, "not_after": c.not_after,
              "expires_in_days": round((c.not_after - now) / 86400, 2)} for c in s.certificates()]
    return {
        "listen": cfg.listen,
        "certificates": certs,
        "handshakes": totals.get("tls_handshakes", 0),
        "failures": {k[len(TLS_FAILED):]: v for k, v in sorted(totals.items()) if k.startswith(TLS_FAILED)},
    }


def snapshot(s: AdminState) -> dict:
    """The dashboard's once-a-second event."""
    names = s.backend_names()
    h = s.agg.history
    point = _point(h[-2], h[-1], names) if len(h) >= 2 else {"ts": time.time(), "b": {}}
    code, hv = health(s)
    t = s.table if s.strategy() == "ml" else None  # the table is shown only when it routes
    mode, reason = s.mode()
    return {
        "point": point,
        "live": live_metrics(s),
        "strategy": s.strategy(),
        "config_strategy": s.config_strategy(),
        "pinned_strategy": s.control.pinned or None,
        "mode": mode if s.strategy() == "ml" else None,
        "reason": reason if s.strategy() == "ml" else None,
        "model_version": t.model_version if t else None,
        "table_seq": t.seq if t else None,
        "table_age": round(time.time() - t.ts, 3) if t else None,
        "health": hv,
        "tls": tls(s),
        "capacity": s.capacity.view(),
        "fleet": s.member.view() if s.member is not None else None,
    }
