"""`/api/route`: the request class of a described request, and the current
routing table (which backend it would go to now: lb/admin/picks.py).

Request classes are the workers' own: `workers.classes.make_classifier`
decides (the first rule whose every set condition holds wins; anything else
is class "default"); this module only puts the reason in words.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lb.core.config import Config
from lb.core.messages import Table
from workers.classes import CHUNKED, make_classifier


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
    """(class name, the reason in words).  The class comes from the workers'
    own classifier (workers/classes.py), so the two cannot disagree."""
    body = req.body_size()
    rules = make_classifier(cfg.classes)
    idx = rules(req.method.encode(), req.path.encode(), body) if rules is not None else 0
    if idx:
        r = cfg.classes[idx - 1]
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
        # per backend: how far the model's error predictions price it (0..1)
        "error_weight": {b: round(w, 4) for b, w in zip(table.backends, table.error_weight)},
        "tick_seconds": table.tick_seconds,
    }
