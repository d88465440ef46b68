"""DNS discovery: `[[backends]]` given by a host name or an SRV name, resolved
and re-resolved by the admin process (one resolver per instance, never on a
worker's event loop), the answers published with the fleet (lb/admin/fleet.py).

* `address = "api.internal:8080"`: every A and AAAA record is a backend on
  that port, with the entry's weight.
* `srv = "_http._tcp.api.internal"`: every target of the lowest priority is
  a backend (each of its addresses, on the record's port), weighted by the
  record's weight (at least 1).

Backends are named `entry@ip:port`; TLS ones verify the name they were
found under (the entry's host or the SRV target) unless `sni` says otherwise.
One look-up per entry every `discovery.interval` seconds, sooner when the
records' TTL is shorter (0.5 s at the least).  With `discovery.resolvers`
the look-ups go to those servers (dnspython); without, A/AAAA go through the
system's resolver (so /etc/hosts counts, TTL unknown) and SRV through
resolv.conf's servers.  A look-up that fails or finds nothing keeps the last
known set: DNS trouble never empties the pool.  It is logged (throttled) and
counted (`lb_discovery_lookups_total{backend,result}`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from lb.core import log
from lb.core.config import Backend, Config
from lb.core.messages import FleetBackend

from .tasks import TaskSet

MIN_WAIT = 0.5  # seconds between two look-ups of one name, whatever the TTL
LOG_EVERY = 30.0  # seconds between two discovery_failed lines for one entry


class LookupFailed(Exception):
    pass


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class Resolver:
    """A and AAAA and SRV look-ups, with the smallest TTL seen (None: unknown)."""

    def __init__(self, cfg: Config) -> None:
        d = cfg.discovery
        self.system = not d.resolvers
        self.timeout = d.timeout
        try:
            self.dns = dns.asyncresolver.Resolver(configure=self.system)
        except dns.resolver.NoResolverConfiguration:
            self.dns = dns.asyncresolver.Resolver(configure=False)
            self.dns.nameservers = ["127.0.0.1"]
        if not self.system:
            self.dns.nameservers = [
                dns.nameserver.Do53Nameserver(host.strip("[]"), int(port))
                for host, _, port in (r.rpartition(":") for r in d.resolvers)
            ]
        self.dns.lifetime = d.timeout
        self.dns.cache = None

    async def addresses(self, host: str) -> tuple[list[str], float | None]:
        if self.system:
            loop = asyncio.get_running_loop()
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), self.timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                raise LookupFailed(f"{host}: {exc.strerror if isinstance(exc, OSError) else 'timed out'}") from None
            return sorted({i[4][0] for i in infos}), None
        ips: list[str] = []
        ttl: float | None = None
        errors = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.dns.resolve(host, rdtype, search=False)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:
                errors.append(f"{rdtype}: {type(exc).__name__}")
                continue
            ips += [r.address for r in answer]
            ttl = answer.rrset.ttl if ttl is None else min(ttl, answer.rrset.ttl)
        if errors and not ips:
            raise LookupFailed(f"{host}: " + ", ".join(errors))
        return sorted(set(ips), key=_ip_order), ttl

    async def srv(self, name: str) -> tuple[list[tuple[str, int, int]], float | None]:
        """(target, port, weight) of the lowest priority group."""
        try:
            answer = await self.dns.resolve(name, "SRV", search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return [], None
        except dns.exception.DNSException as exc:
            raise LookupFailed(f"{name}: SRV: {type(exc).__name__}") from None
        records = list(answer)
        if not records:
            return [], answer.rrset.ttl
        top = min(r.priority for r in records)
        out = [(r.target.to_text(omit_final_dot=True), r.port, r.weight) for r in records if r.priority == top]
        return out, answer.rrset.ttl


def _ip_order(ip: str):
    a = ipaddress.ip_address(ip)
    return (a.version, a)


async def look_up(resolver: Resolver, entry: Backend) -> tuple[list[FleetBackend], float | None]:
    """The backends `entry` stands for now, and how long that answer holds."""
    found: list[FleetBackend] = []
    if entry.srv:
        targets, ttl = await resolver.srv(entry.srv)
        for target, port, weight in targets:
            ips, t = await resolver.addresses(target)
            if t is not None:
                ttl = t if ttl is None else min(ttl, t)
            for ip in ips:
                addr = _address(ip, port)
                found.append(FleetBackend(f"{entry.name}@{addr}", addr, max(1, min(1000, weight)),
                                          entry.tls, (entry.sni or target) if entry.tls else "", "dns"))
    else:
        host, _, port = entry.address.rpartition(":")
        ips, ttl = await resolver.addresses(host)
        for ip in ips:
            addr = _address(ip, int(port))
            found.append(FleetBackend(f"{entry.name}@{addr}", addr, entry.weight, entry.tls,
                                      (entry.sni or host) if entry.tls else "", "dns"))
    found.sort(key=lambda fb: fb.name)
    return found, ttl


class Discovery(TaskSet):
    """One task per entry given by name; restarted when a reload changes them."""

    def __init__(self, state) -> None:
        super().__init__()
        self.state = state  # AdminState: .cfg, .fleet, .fleet_changed()
        self.lookups: dict[tuple[str, str], int] = {}  # (entry, result) -> count
        self.logged: dict[str, float] = {}

    def wanted(self):
        cfg = self.state.cfg
        entries = [b for b in cfg.backends if cfg.discovers and b.dynamic]
        return (cfg.discovery, tuple(entries)), (cfg, entries)

    def restart(self, what) -> None:
        cfg, entries = what
        if entries:
            resolver = Resolver(cfg)
            loop = asyncio.get_running_loop()
            for e in entries:
                self.tasks[e.name] = loop.create_task(self._entry_loop(resolver, e, cfg.discovery.interval))

    async def _entry_loop(self, resolver: Resolver, entry: Backend, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = interval
            try:
                found, ttl = await look_up(resolver, entry)
            except LookupFailed as exc:
                self._failed(entry.name, "error", str(exc), loop.time())
            else:
                if ttl is not None:
                    wait = max(MIN_WAIT, min(interval, ttl))
                if found:
                    self._count(entry.name, "ok")
                    if self.state.fleet.set_discovered(entry.name, found):
                        self.state.fleet_changed()
                else:
                    self._failed(entry.name, "empty", "no records", loop.time())
            await asyncio.sleep(wait)

    def _count(self, entry: str, result: str) -> None:
        key = (entry, result)
        self.lookups[key] = self.lookups.get(key, 0) + 1

    def _failed(self, entry: str, result: str, error: str, now: float) -> None:
        self._count(entry, result)
        if now - self.logged.get(entry, -LOG_EVERY) >= LOG_EVERY:
            self.logged[entry] = now
            kept = len(self.state.fleet.dns.get(entry, []))
            log.log("discovery_failed", backend=entry, result=result, error=error, kept=kept)
