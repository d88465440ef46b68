"""A member of a fleet of lb hosts sharing one etcd (`[fleet]`), run by the admin process.

Layout under `prefix` (written by operators and deploy tools with etcdctl):

    PREFIX/backends/NAME   {"address": "10.0.0.7:8080", "weight": 1, "drain": false}
    PREFIX/members/ID      written by each member under a lease: what it serves,
                           its version and request rate; gone `lease_ttl` after
                           the member stops refreshing it
    PREFIX/leader, PREFIX/model
                           the member that trains the fleet's learned model, and
                           the latest model it published (lb/admin/modelshare.py)

The member reads every backend (a snapshot and its revision), then watches
the prefix from the next revision: a change reaches the workers of every
member within milliseconds of etcd accepting it, with no reload.  A backend
whose value is not valid JSON with an IP `address` is skipped, logged and
counted; `"drain": true` stops new requests to it (in-flight ones finish).

etcd down or unreachable: the member keeps serving with what it last knew
(also kept in `backends.json`, for a restart during the outage), reports
`lb_fleet_connected 0`, and tries the endpoints in turn with a growing pause
(0.25 s to 2 s).  When it reconnects it watches from the last revision it
saw, so nothing written meanwhile is missed; if etcd compacted that revision
away it takes a fresh snapshot instead.

The client is aetcd (asyncio, etcd's v3 gRPC API): a maintained client that
runs on the admin process's event loop, with watches and leases.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aetcd
import aetcd.exceptions

from lb import __version__
from lb.core import log
from lb.core.messages import FleetBackend

from .fleet import NAME, FleetError, canonical
from .modelshare import ModelShare

LOG_EVERY = 30.0  # seconds between two etcd_unreachable lines
BACKOFF = (0.25, 0.5, 1.0, 2.0)  # seconds between attempts, growing while etcd stays away


def parse_backend(name: str, raw: bytes) -> tuple[FleetBackend, bool]:
    """One PREFIX/backends/NAME value -> (backend, drained); ValueError says why not."""
    if not NAME.fullmatch(name):
        raise ValueError("name: letters, digits and . _ : - [ ] only")
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(d, dict) or not isinstance(d.get("address"), str):
        raise ValueError('expected {"address": "ip:port", "weight": 1, "drain": false}')
    unknown = set(d) - {"address", "weight", "drain", "tls", "sni"}
    if unknown:
        raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
    try:
        address = canonical(d["address"])
    except FleetError as exc:
        raise ValueError(exc.message) from None
    weight, drain, tls, sni = d.get("weight", 1), d.get("drain", False), d.get("tls", False), d.get("sni", "")
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000:
        raise ValueError("weight: an integer between 0 and 1000")
    if not isinstance(drain, bool) or not isinstance(tls, bool) or not isinstance(sni, str):
        raise ValueError("drain and tls: true or false; sni: a string")
    return FleetBackend(name, address, weight, tls, sni, "etcd"), drain


class Member:
    def __init__(self, state) -> None:
        self.state = state  # AdminState: .cfg, .fleet, .fleet_changed(), .agg
        f = state.cfg.fleet
        self.endpoints = [url[len("http://"):].rstrip("/").rpartition(":") for url in f.etcd]
        self.prefix = f.prefix.encode() + b"/"
        self.backends_prefix = self.prefix + b"backends/"
        self.members_prefix = self.prefix + b"members/"
        self.id = f.member or f"{socket.gethostname()}:{state.cfg.admin.listen.rpartition(':')[2]}"
        self.ttl = f.lease_ttl
        self.connected = False
        self.endpoint = ""  # the one in use
        self.revision = 0  # the last revision applied
        self.members: dict[str, dict] = {}  # id -> what it registered
        self.backends: dict[str, FleetBackend] = dict(state.fleet.etcd)
        self.drained: set[str] = set(state.fleet.etcd_drained)
        self.invalid: dict[str, str] = {}  # backend key -> why it was skipped
        self.disconnects = 0
        self.snapshots = 0
        self.task: asyncio.Task | None = None
        self._logged = -LOG_EVERY
        self.share = ModelShare(state, self.id, self.prefix)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    # -- the session loop ------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        i = 0
        while True:
            host, _, port = self.endpoints[i % len(self.endpoints)]
            client = aetcd.Client(host.strip("[]"), int(port), timeout=2, connect_wait_timeout=2)
            try:
                await self._session(client, f"{host}:{port}")
                attempt = 0
            except aetcd.exceptions.RevisionCompactedError as exc:
                log.log("fleet_revision_compacted", revision=self.revision, compacted=exc.compacted_revision)
                self.revision = 0  # a fresh snapshot next time
                attempt = 0
                continue
            except (aetcd.exceptions.ClientError, OSError, asyncio.TimeoutError) as exc:
                self._disconnected(f"{host}:{port}", exc)
                i += 1
                attempt += 1
            finally:
                try:
                    await client.close()
                except Exception:  # noqa: BLE001 - the connection is being dropped anyway
                    pass
            await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])

    async def _session(self, client, endpoint: str) -> None:
        if self.revision == 0:
            await self._snapshot(client)
        lease = await client.lease(int(max(2, self.ttl)))
        await self._register(client, lease)
        await self.share.step(client, lease)
        watch = await client.watch_prefix(self.backends_prefix, start_revision=self.revision + 1)
        keeper = asyncio.get_running_loop().create_task(self._keep(client, lease))
        self.connected, self.endpoint = True, endpoint
        log.log("fleet_connected", etcd=endpoint, member=self.id, revision=self.revision,
                backends=len(self.backends))
        try:
            async for ev in watch:
                self._event(ev)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        raise aetcd.exceptions.ConnectionFailedError("watch ended")

    async def _snapshot(self, client) -> None:
        r = await client.get_prefix(self.backends_prefix)
        backends, drained, invalid = {}, set(), {}
        for kv in r:
            name = kv.key[len(self.backends_prefix):].decode("utf-8", "replace")
            try:
                fb, drain = parse_backend(name, kv.value)
            except ValueError as exc:
                invalid[name] = str(exc)
                continue
            backends[name] = fb
            if drain:
                drained.add(name)
        for name in sorted(set(invalid) - set(self.invalid)):
            log.log("fleet_backend_invalid", backend=name, error=invalid[name])
        self.backends, self.drained, self.invalid = backends, drained, invalid
        self.revision = r.header.revision
        self.snapshots += 1
        self._publish()

    def _event(self, ev) -> None:
        name = ev.kv.key[len(self.backends_prefix):].decode("utf-8", "replace")
        self.revision = max(self.revision, ev.kv.mod_revision)
        self.backends.pop(name, None)
        self.drained.discard(name)
        self.invalid.pop(name, None)
        if ev.kind == aetcd.rtypes.EventKind.PUT:
            try:
                fb, drain = parse_backend(name, ev.kv.value)
            except ValueError as exc:
                self.invalid[name] = str(exc)
                log.log("fleet_backend_invalid", backend=name, error=str(exc))
            else:
                self.backends[name] = fb
                if drain:
                    self.drained.add(name)
        self._publish()

    def _publish(self) -> None:
        if self.state.fleet.set_shared(self.backends, self.drained):
            self.state.fleet_changed()

    async def _register(self, client, lease) -> None:
        s = self.state
        cfg = s.cfg
        value = {"id": self.id, "listen": cfg.listen, "admin": cfg.admin.listen, "tls": cfg.tls.listen or None,
                 "version": __version__, "backends": len(s.fleet.backends()),
                 "rps": round(s.capacity.load_rps(), 3), "started": s.started, "ts": time.time()}
        await client.put(self.members_prefix + self.id.encode(), json.dumps(value).encode(), lease=lease)

    async def _keep(self, client, lease) -> None:
        """Refresh the lease and this member's entry; read the member list."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            await lease.refresh()
            await self._register(client, lease)
            r = await client.get_prefix(self.members_prefix)
            members = {}
            for kv in r:
                try:
                    members[kv.key[len(self.members_prefix):].decode()] = json.loads(kv.value)
                except (ValueError, UnicodeDecodeError):
                    continue
            self.members = members
            await self.share.step(client, lease)

    def _disconnected(self, endpoint: str, exc: BaseException) -> None:
        if self.connected:
            self.disconnects += 1
            log.log("fleet_disconnected", etcd=endpoint, error=_why(exc), revision=self.revision)
        self.connected = False
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY:
            self._logged = now
            log.log("etcd_unreachable", etcd=endpoint, error=_why(exc), kept=len(self.backends))

    def view(self) -> dict:
        return {
            "member": self.id, "connected": self.connected, "etcd": self.endpoint or None,
            "prefix": self.prefix.decode().rstrip("/"), "revision": self.revision,
            "backends": sorted(self.backends), "drained": sorted(self.drained),
            "invalid": dict(sorted(self.invalid.items())),
            "members": [self.members[k] for k in sorted(self.members)],
            **self.share.view(),
        }


def _why(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:300]
