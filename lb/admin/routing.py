"""`/api/route`: the current routing table, and which backend a described
request would go to now, and why.

Request classes follow the config's `[[classes]]` rules exactly as the
workers apply them: the first rule whose every set condition holds wins
(method in `methods`, target starting with `path_prefix`, declared body size
within [min_body, max_body]; a chunked body has no declared size and only
matches rules without `max_body`); anything else is class "default".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lb.config import Config
from lb.messages import Table

CHUNKED = -1


class BadRequest(ValueError):
    """A request description that cannot be evaluated (answered with 400)."""


@dataclass
class RouteRequest:
    method: str
    path: str
    headers: dict[str, str]

    @classmethod
    def parse(cls, data: object) -> RouteRequest:
        if not isinstance(data, dict):
            raise BadRequest("expected a JSON object with method, path and headers")
        unknown = set(data) - {"method", "path", "headers"}
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        method = data.get("method", "GET")
        path = data.get("path", "/")
        headers = data.get("headers", {})
        if not isinstance(method, str) or not method.isalpha() or len(method) > 20:
            raise BadRequest("method: expected an HTTP method such as \"GET\"")
        if not isinstance(path, str) or not path.startswith("/"):
            raise BadRequest("path: expected a string starting with '/'")
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int)) for k, v in headers.items()
        ):
            raise BadRequest("headers: expected an object of header name -> string value")
        return cls(method.upper(), path, {k.lower(): str(v).strip() for k, v in headers.items()})

    def body_size(self) -> int:
        te = self.headers.get("transfer-encoding", "")
        if te and te.lower() != "identity":
            return CHUNKED
        cl = self.headers.get("content-length")
        if cl is None or cl == "":
            return 0
        if not (cl.isascii() and cl.isdigit()) or len(cl) > 18:
            raise BadRequest("headers: content-length must be a non-negative integer (at most 18 digits)")
        return int(cl)


def classify(cfg: Config, req: RouteRequest) -> tuple[str, str]:
    """(class name, the reason in words)."""
    body = req.body_size()
    for r in cfg.classes:
        if r.methods and req.method not in r.methods:
            continue
        if r.path_prefix and not req.path.startswith(r.path_prefix):
            continue
        if body == CHUNKED:
            if r.max_body:
                continue
        elif body < r.min_body or (r.max_body and body > r.max_body):
            continue
        why = [f"rule {r.name!r}"]
        if r.methods:
            why.append(f"method {req.method} in {r.methods}")
        if r.path_prefix:
            why.append(f"path starts with {r.path_prefix!r}")
        if r.min_body or r.max_body:
            size = "chunked" if body == CHUNKED else f"{body} bytes"
            why.append(f"body {size} within [{r.min_body}, {r.max_body or 'inf'}]")
        return r.name, ": ".join([why[0], ", ".join(why[1:]) or "matches everything"])
    return "default", "no [[classes]] rule matches" if cfg.classes else "no [[classes]] rules configured"


def table_view(table: Table | None, received_mono: float) -> dict | None:
    """The routing table as JSON (weights per class, per backend)."""
    if table is None:
        return None
    return {
        "epoch": table.epoch,
        "seq": table.seq,
        "age": round(max(0.0, time.time() - table.ts), 3),
        "received_ago": round(time.monotonic() - received_mono, 3),
        "interval": table.interval,
        "stale": time.time() - table.ts > 2 * table.interval,
        "model_version": table.model_version,
        "mode": table.mode,
        "reason": table.reason,
        "backends": table.backends,
        "classes": table.classes,
        "weights": {
            cls: {b: round(w, 6) for b, w in zip(table.backends, row)}
            for cls, row in zip(table.classes, table.weights)
        },
        "prediction_error": table.prediction_error,
        "tick_seconds": table.tick_seconds,
    }


@dataclass
class Candidate:
    name: str
    config_weight: int
    inflight: int
    ewma: float
    drained: bool
    down: bool

    @property
    def routable(self) -> bool:
        return self.config_weight > 0 and not self.drained and not self.down


def explain(strategy: str, cls: str, candidates: list[Candidate], table: Table | None,
            mode: str, reason: str) -> dict:
    """Which backend the given strategy would most likely pick now, and why."""
    live = [c for c in candidates if c.routable]
    excluded = {c.name: ("drained" if c.drained else "down" if c.down else "weight 0")
                for c in candidates if not c.routable}
    out: dict = {"strategy": strategy, "excluded": excluded}
    if not live:
        out.update(backend=None, why="no routable backend: lb answers 503")
        return out
    if strategy == "ml":
        out["mode"] = mode
        out["mode_reason"] = reason
        if mode == "learned" and table is not None and cls in table.classes:
            row = table.weights[table.classes.index(cls)]
            names = {c.name for c in live}
            weights = {b: w for b, w in zip(table.backends, row) if b in names}
            total = sum(weights.values())
            if total > 0:
                shares = {b: round(w / total, 4) for b, w in weights.items()}
                best = max(shares, key=shares.__getitem__)
                out.update(
                    backend=best, weights=shares, table_seq=table.seq,
                    model_version=table.model_version,
                    why=f"learned table seq {table.seq}, class {cls!r}: picked by weight "
                        f"(with in-flight counts); {best} has the largest share {shares[best]:.0%}",
                )
                return out
        # Fallback: what the workers do without a usable table.
        out.update(_p2c(live), why_fallback=reason or "no usable table")
        out["why"] = f"fallback ({reason or 'no usable table'}): " + out["why"]
        return out
    if strategy == "p2c_ewma":
        out.update(_p2c(live))
    elif strategy == "least_connections":
        best = min(live, key=lambda c: c.inflight)
        out.update(backend=best.name, inflight={c.name: c.inflight for c in live},
                   why=f"least in-flight requests now: {best.name} ({best.inflight})")
    elif strategy == "weighted_round_robin":
        total = sum(c.config_weight for c in live)
        shares = {c.name: round(c.config_weight / total, 4) for c in live}
        best = max(shares, key=shares.__getitem__)
        out.update(backend=best, weights=shares,
                   why="smooth weighted round robin: each backend in turn, in proportion to its weight")
    else:  # round_robin, random
        out.update(backend=live[0].name, weights={c.name: round(1 / len(live), 4) for c in live},
                   why=f"{strategy}: every routable backend equally; the next one depends on the worker")
    return out


def _p2c(live: list[Candidate]) -> dict:
    scores = {c.name: c.ewma * (c.inflight + 1) for c in live}
    best = min(scores, key=scores.__getitem__)
    return {
        "backend": best,
        "scores": {n: round(s, 6) for n, s in scores.items()},
        "why": f"p2c_ewma: of two random backends the lower ewma x (inflight+1) wins; "
               f"lowest now: {best} ({scores[best]:.6f})",
    }
