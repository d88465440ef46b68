"""The admin endpoints.

Reads are open; every mutating endpoint needs `Authorization: Bearer TOKEN`
where TOKEN is `[admin] token`, or the LB_ADMIN_TOKEN environment variable
when that is empty.  No header: 401 with WWW-Authenticate; a wrong token:
403; no token configured at all: 403 saying so.
"""

from __future__ import annotations

import asyncio
import hmac
from importlib import resources

from prometheus_client import CONTENT_TYPE_LATEST

from lb.core.config import STRATEGIES

from . import views
from .fleet import FleetError
from .hosts import HostCheck
from .httpserver import HTTPError, Request, Response, Router, json_response, to_json
from .metrics import Exporter
from .picks import BackendState, explain
from .routing import BadRequest, RouteRequest, classify
from .state import AdminState, admin_token

EVENT_INTERVAL = 1.0  # seconds between two dashboard events


def _dashboard() -> bytes:
    return resources.files("lb.admin").joinpath("dashboard.html").read_bytes()


class API:
    def __init__(self, state: AdminState) -> None:
        self.s = state
        self.exporter = Exporter(state)
        self.page = _dashboard()
        self.stopping = asyncio.Event()
        self._hosts: tuple[list[str], HostCheck] | None = None
        r = self.router = Router()
        r.add("GET", "/", self.index)
        r.add("GET", "/metrics", self.metrics)
        r.add("GET", "/api/health", self.health)
        r.add("GET", "/api/metrics", self.live_metrics)
        r.add("GET", "/api/route", self.get_route)
        r.add("POST", "/api/route", self.post_route)
        r.add("GET", "/api/backends", self.backends)
        r.add("POST", "/api/backends", self.add_backend)
        r.add("PATCH", "/api/backends/{name}", self.patch_backend)
        r.add("DELETE", "/api/backends/{name}", self.delete_backend)
        r.add("POST", "/api/backends/{name}/drain", self.drain)
        r.add("POST", "/api/backends/{name}/enable", self.enable)
        r.add("GET", "/api/strategy", self.get_strategy)
        r.add("POST", "/api/strategy", self.post_strategy)
        r.add("GET", "/api/events", self.events)
        r.add("GET", "/api/tls", self.get_tls)
        r.add("GET", "/api/capacity", self.get_capacity)
        r.add("GET", "/api/fleet", self.get_fleet)

    # -- auth -----------------------------------------------------------------------

    def host_ok(self, host: str | None) -> bool:
        """The Host check of every request, by the running config's allowed_hosts
        (a reload may change them)."""
        allowed = self.s.cfg.admin.allowed_hosts
        if self._hosts is None or self._hosts[0] != allowed:
            self._hosts = (allowed, HostCheck(allowed))
        return self._hosts[1].allows(host)

    def authorize(self, req: Request) -> None:
        token = admin_token(self.s.cfg)
        header = req.headers.get("authorization")
        if header is None:
            raise HTTPError(401, "this endpoint needs Authorization: Bearer <token>",
                            [("WWW-Authenticate", 'Bearer realm="lb-admin"')])
        if not token:
            raise HTTPError(403, "no admin token configured ([admin] token or LB_ADMIN_TOKEN): "
                                 "mutating endpoints are disabled")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPError(403, "invalid admin token")

    # -- reads ---------------------------------------------------------------------------

    async def index(self, req: Request) -> Response:
        return Response(200, self.page, "text/html; charset=utf-8",
                        [("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff")])

    async def metrics(self, req: Request) -> Response:
        # Saved before answering: a replacement admin process never exposes less
        # than a scraper has already seen.
        self.s.counters.save(self.s.agg)
        return Response(200, self.exporter.render(), CONTENT_TYPE_LATEST)

    async def health(self, req: Request) -> Response:
        code, body = views.health(self.s)
        return json_response(body, code)

    async def live_metrics(self, req: Request) -> Response:
        window = views.LIVE_WINDOW
        if "window" in req.query:
            try:
                window = float(req.query["window"][0])
            except ValueError:
                raise HTTPError(400, "window: expected seconds as a number") from None
            if not 1 <= window <= 300:
                raise HTTPError(400, "window: between 1 and 300 seconds")
        return json_response(views.live_metrics(self.s, window))

    async def get_route(self, req: Request) -> Response:
        return json_response(views.route(self.s))

    async def backends(self, req: Request) -> Response:
        return json_response({"backends": views.backends(self.s)})

    async def get_capacity(self, req: Request) -> Response:
        return json_response(self.s.capacity.view())

    async def get_fleet(self, req: Request) -> Response:
        if self.s.member is None:
            raise HTTPError(404, "no fleet configured ([fleet] etcd)")
        return json_response(self.s.member.view())

    async def get_tls(self, req: Request) -> Response:
        view = views.tls(self.s)
        if view is None:
            raise HTTPError(404, "no HTTPS listener configured ([tls] listen)")
        return json_response(view)

    async def get_strategy(self, req: Request) -> Response:
        return json_response(self._strategy_view())

    def _strategy_view(self) -> dict:
        return {"strategy": self.s.strategy(), "config_strategy": self.s.config_strategy(),
                "pinned_strategy": self.s.control.pinned or None, "valid": list(STRATEGIES)}

    async def post_route(self, req: Request) -> Response:
        try:
            rr = RouteRequest.parse(req.json())
            cls, cls_why = classify(self.s.cfg, rr)
        except BadRequest as exc:
            raise HTTPError(400, str(exc)) from None
        mode, reason = self.s.mode()
        cfg = self.s.cfg
        decision = explain(self.s.strategy(), cls, cfg.class_names, self.backend_states(), self.s.table,
                           mode, reason, cfg.balancer.ewma_decay)
        return json_response({"class": cls, "class_reason": cls_why, **decision})

    def backend_states(self) -> list[BackendState]:
        """Every backend as one live worker sees it on average (in-flight per worker)."""
        g = self.s.agg.gauges()
        workers = max(g.workers, 1)
        weights = self.s.config_weights()
        control = self.s.control
        out = []
        for n in self.s.backend_names():
            w = weights.get(n, 0)
            if n in control.drained:
                excluded = "drained"
            elif n in control.down:
                excluded = "down"
            elif w <= 0:
                excluded = "weight 0"
            elif g.workers and g.unavailable.get(n, 0) >= g.workers:
                excluded = "ejected"  # by every live worker's passive outlier detection
            else:
                excluded = None
            out.append(BackendState(n, w, g.inflight.get(n, 0) / workers, g.ewma.get(n, 0.0), excluded))
        return out

    # -- writes --------------------------------------------------------------------------------

    def _backend(self, name: str) -> str:
        if name not in self.s.backend_names():
            raise HTTPError(404, f"unknown backend {name!r}; known: {', '.join(self.s.backend_names())}")
        return name

    async def drain(self, req: Request, name: str) -> Response:
        self.authorize(req)
        changed = self.s.control.set_drained(self._backend(name), True)
        return json_response({"backend": name, "drained": True, "changed": changed})

    async def enable(self, req: Request, name: str) -> Response:
        self.authorize(req)
        changed = self.s.control.set_drained(self._backend(name), False)
        return json_response({"backend": name, "drained": False, "changed": changed})

    async def add_backend(self, req: Request) -> Response:
        """Into the fleet at once, no reload: every worker routes to it within milliseconds."""
        self.authorize(req)
        fb = self._fleet_change(self.s.fleet.add, req.json())
        return json_response(_fleet_view(fb), 201, [("Location", f"/api/backends/{fb.name}")])

    async def patch_backend(self, req: Request, name: str) -> Response:
        self.authorize(req)
        return json_response(_fleet_view(self._fleet_change(self.s.fleet.set_weight, name, req.json())))

    async def delete_backend(self, req: Request, name: str) -> Response:
        """Out of the fleet: no new requests; those in flight finish on it."""
        self.authorize(req)
        fb = self._fleet_change(self.s.fleet.remove, name)
        return json_response({**_fleet_view(fb), "removed": True})

    def _fleet_change(self, change, *args):
        try:
            fb = change(*args)
        except FleetError as exc:
            raise HTTPError(exc.status, exc.message) from None
        self.s.fleet_changed()
        return fb

    async def post_strategy(self, req: Request) -> Response:
        self.authorize(req)
        data = req.json()
        if not isinstance(data, dict) or "strategy" not in data:
            raise HTTPError(400, 'expected {"strategy": NAME} to pin or {"strategy": null} to unpin')
        name = data["strategy"]
        if name is not None and (not isinstance(name, str) or name not in STRATEGIES):
            raise HTTPError(400, f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)} (or null to unpin)")
        changed = self.s.control.set_pinned(name or "")
        return json_response({**self._strategy_view(), "changed": changed})

    # -- the dashboard feed ---------------------------------------------------------------------

    async def events(self, req: Request) -> Response:
        return Response(200, content_type="text/event-stream", stream=self._event_stream())

    async def _event_stream(self):
        yield b"retry: 2000\n\n"
        yield _sse("history", views.history(self.s))
        while not self.stopping.is_set():
            yield _sse("snapshot", views.snapshot(self.s))
            try:
                await asyncio.wait_for(self.stopping.wait(), EVENT_INTERVAL)
            except asyncio.TimeoutError:
                pass


def _fleet_view(fb) -> dict:
    return {"name": fb.name, "address": fb.address, "weight": fb.weight, "tls": fb.tls,
            "sni": fb.sni or None, "source": fb.source}


def _sse(event: str, data: object) -> bytes:
    payload = to_json(data)
    return f"event: {event}\ndata: {payload}\n\n".encode()
