"""The instance's fleet: the backends it routes to, and where each came from.

Three sources (composed by lb/core/fleet.py; the first to name a backend wins):

    config  `[[backends]]` with an IP address
    dns     what discovery found for `[[backends]]` given by a host name or an
            SRV name (lb/admin/discovery.py); a failed look-up keeps the last set
    api     backends added with `POST /api/backends`

The admin process owns the last two and publishes them in the `Control`
state; workers and the inference process compose them with their own config
and apply every change in place, within milliseconds, without a reload.  The API's backends and the last DNS answers
are kept in `backends.json` in the state directory, so a reload, a restart of
the admin process and (with `state_dir` configured) a restart of lb keep them.
A reload whose config names a backend the API added (same name or address)
takes it over, and the API's entry is dropped.
"""

from __future__ import annotations

import json
import os
import re

from lb.core import log
from lb.core.config import FLEET_FILE, Config, parse_address
from lb.core.fleet import compose
from lb.core.messages import FleetBackend

NAME = re.compile(r"[A-Za-z0-9._:\[\]-]{1,200}")  # no "@": that is how DNS discovery names its backends


class FleetError(ValueError):
    """A refused change, with the HTTP status the admin API answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def canonical(address: str) -> str:
    """'ip:port' with the IP address normalised, or FleetError(400)."""
    import ipaddress

    try:
        host, port = parse_address(address, allow_hostname=False)
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise FleetError(400, f"address: {exc} (an IP address and a port; names are resolved by "
                              "[[backends]] entries in the config file)") from None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


class Fleet:
    def __init__(self, cfg: Config, state_dir: str) -> None:
        self.cfg = cfg
        self.path = os.path.join(state_dir, FLEET_FILE) if state_dir else ""
        self.dns: dict[str, list[FleetBackend]] = {}  # config entry name -> last known backends
        self.api: dict[str, FleetBackend] = {}
        self.etcd: dict[str, FleetBackend] = {}  # the fleet's backends in etcd (lb/admin/etcd.py)
        self.etcd_drained: set[str] = set()  # ... with "drain": true
        self.version = 0  # +1 per change, for whoever caches a view of the fleet
        self._load()
        self._prune()

    # -- the composed list ------------------------------------------------------------------

    def backends(self) -> list[FleetBackend]:
        """The fleet as the admin's config composes it (lb/core/fleet.py)."""
        return compose(self.cfg, self.dns, list(self.api.values()), list(self.etcd.values()))

    def source(self, name: str) -> str | None:
        for fb in self.backends():
            if fb.name == name:
                return fb.source
        return None

    # -- changes ----------------------------------------------------------------------------

    def set_config(self, cfg: Config) -> None:
        """A reload: entries no longer given by name forget their answers; the
        config takes over API backends it names."""
        self.cfg = cfg
        if self._prune():
            self._changed()

    def set_discovered(self, entry: str, found: list[FleetBackend]) -> bool:
        """The answer of one look-up (never empty: a failed or empty look-up keeps
        the last set).  True if the fleet changed."""
        if self.dns.get(entry) == found:
            return False
        before = {fb.name for fb in self.dns.get(entry, [])}
        after = {fb.name for fb in found}
        self.dns[entry] = list(found)
        log.log("discovery_changed", backend=entry, added=sorted(after - before),
                removed=sorted(before - after), backends=len(found))
        self._changed()
        return True

    def set_shared(self, backends: dict[str, FleetBackend], drained: set[str]) -> bool:
        """The fleet's backends as etcd holds them now.  True if anything changed.
        Saved with the others: a member that restarts while etcd is down starts
        from what it last knew."""
        if backends == self.etcd and drained == self.etcd_drained:
            return False
        added = sorted(set(backends) - set(self.etcd))
        removed = sorted(set(self.etcd) - set(backends))
        changed = sorted(n for n in set(backends) & set(self.etcd) if backends[n] != self.etcd[n])
        log.log("fleet_backends_changed", source="etcd", added=added, removed=removed, changed=changed,
                drained=sorted(drained), backends=len(backends))
        self.etcd, self.etcd_drained = dict(backends), set(drained)
        self._changed()
        return True

    def add(self, body: object) -> FleetBackend:
        if not isinstance(body, dict):
            raise FleetError(400, "expected a JSON object")
        unknown = set(body) - {"address", "weight", "name", "tls", "sni"}
        if unknown:
            raise FleetError(400, f"unknown field {sorted(unknown)[0]!r}")
        address = body.get("address")
        if not isinstance(address, str):
            raise FleetError(400, "address: required, a string 'ip:port'")
        address = canonical(address)
        weight = _weight(body.get("weight", 1))
        name = body.get("name", address)
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise FleetError(400, "name: 1-200 characters of letters, digits and . _ : - [ ]")
        tls = body.get("tls", False)
        if not isinstance(tls, bool):
            raise FleetError(400, "tls: must be true or false")
        sni = body.get("sni", "")
        if not isinstance(sni, str) or (sni and not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", sni)):
            raise FleetError(400, "sni: must be a DNS name")
        for fb in self.backends():
            if fb.name == name:
                raise FleetError(409, f"backend {name!r} exists (source {fb.source})")
            if fb.address == address:
                raise FleetError(409, f"address {address} is served by backend {fb.name!r}")
        fb = FleetBackend(name, address, weight, tls, sni, "api")
        self.api[name] = fb
        log.log("backend_added", backend=name, address=address, weight=weight, source="api")
        self._changed()
        return fb

    def set_weight(self, name: str, body: object) -> FleetBackend:
        fb = self._api_backend(name)
        if not isinstance(body, dict) or set(body) != {"weight"}:
            raise FleetError(400, 'expected {"weight": N}')
        weight = _weight(body["weight"])
        if weight != fb.weight:
            fb = self.api[name] = FleetBackend(fb.name, fb.address, weight, fb.tls, fb.sni, "api")
            log.log("backend_weight_set", backend=name, weight=weight)
            self._changed()
        return fb

    def remove(self, name: str) -> FleetBackend:
        """Out of the fleet: workers send it nothing new and let its requests in
        flight finish before they close its connections."""
        fb = self._api_backend(name)
        del self.api[name]
        log.log("backend_removed", backend=name, source="api")
        self._changed()
        return fb

    def _api_backend(self, name: str) -> FleetBackend:
        source = self.source(name)
        if source is None:
            raise FleetError(404, f"no backend {name!r}")
        if source != "api":
            where = {"config": "the config file", "dns": "DNS discovery", "etcd": "etcd"}.get(source, source)
            raise FleetError(409, f"backend {name!r} comes from {where}: change it there (or drain it)")
        return self.api[name]

    def _prune(self) -> bool:
        cfg = self.cfg
        changed = False
        named = {b.name for b in cfg.backends if cfg.discovers and b.dynamic}
        for entry in list(self.dns):
            if entry not in named:
                del self.dns[entry]
                changed = True
        if not cfg.fleet.etcd and self.etcd:  # no fleet any more
            self.etcd, self.etcd_drained = {}, set()
            changed = True
        names = {b.name for b in cfg.backends}
        addresses = {b.address for b in cfg.backends}
        for name, fb in list(self.api.items()):
            if name in names or fb.address in addresses:
                del self.api[name]
                log.log("backend_taken_by_config", backend=name, address=fb.address)
                changed = True
        return changed

    def _changed(self) -> None:
        self.version += 1
        self._save()

    # -- the state file -----------------------------------------------------------------------

    def _save(self) -> None:
        if not self.path:
            return
        data = {
            "api": [_plain(fb) for fb in self.api.values()],
            "dns": {entry: [_plain(fb) for fb in found] for entry, found in self.dns.items()},
            "etcd": [_plain(fb) for fb in self.etcd.values()],
            "etcd_drained": sorted(self.etcd_drained),
        }
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.log("fleet_state_write_failed", path=self.path, error=exc.strerror or str(exc))

    def _load(self) -> None:
        if not self.path:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            api = [_backend(d, "api") for d in data.get("api", [])]
            dns = {str(e): [_backend(d, "dns") for d in found] for e, found in dict(data.get("dns", {})).items()}
            etcd = [_backend(d, "etcd") for d in data.get("etcd", [])] if self.cfg.fleet.etcd else []
            etcd_drained = {str(n) for n in data.get("etcd_drained", [])}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.log("fleet_state_unreadable", path=self.path, error=str(exc))
            return
        self.api = {fb.name: fb for fb in api}
        self.dns = {e: found for e, found in dns.items() if found}
        self.etcd = {fb.name: fb for fb in etcd}
        self.etcd_drained = etcd_drained & set(self.etcd)
        log.log("fleet_state_loaded", path=self.path, api=len(self.api),
                dns=sum(len(v) for v in self.dns.values()), etcd=len(self.etcd))


def _weight(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
        raise FleetError(400, "weight: an integer between 0 and 1000")
    return value


def _plain(fb: FleetBackend) -> dict:
    return {"name": fb.name, "address": fb.address, "weight": fb.weight, "tls": fb.tls, "sni": fb.sni}


def _backend(d: dict, source: str) -> FleetBackend:
    """One saved entry, checked as strictly as when it was added."""
    name, address = d["name"], d["address"]
    if not isinstance(name, str) or not isinstance(address, str):
        raise ValueError("name and address must be strings")
    address = canonical(address)
    return FleetBackend(name, address, _weight(d.get("weight", 1)), bool(d.get("tls", False)),
                        str(d.get("sni", "")), source)
