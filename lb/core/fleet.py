"""How the fleet is composed: the one rule every process applies.

The admin process publishes the parts of the fleet that are not in the config
file (`Control.discovered`: the last DNS answers per `[[backends]]` entry;
`Control.shared`: the fleet's backends in etcd; `Control.added`: the backends
added through the admin API).  Each process
composes them with ITS OWN config, so that during a reload the old and the
new generation of workers each route to their own config's backends plus the
same runtime ones, whatever config the admin process has caught up with.

Order, first source to name a backend wins (by name, or by address for
the API's backends):

    config  `[[backends]]` with an IP address, in file order; an entry given
            by name (or srv) expands in place to its discovered backends
    etcd    the fleet's backends (`[fleet]`), by name
    api     the API's backends, by name
"""

from __future__ import annotations

from lb.core.messages import FleetBackend


def compose(cfg, discovered: dict[str, list[FleetBackend]], added: list[FleetBackend],
            shared: list[FleetBackend] = ()) -> list[FleetBackend]:
    out: list[FleetBackend] = []
    names: set[str] = set()
    addresses: set[str] = set()
    discovers = cfg.discovers
    for b in cfg.backends:
        if discovers and b.dynamic:
            found = discovered.get(b.name, [])
        else:
            found = [FleetBackend(b.name, b.address, b.weight, b.tls, b.sni, "config")]
        for fb in found:
            if fb.name not in names:
                names.add(fb.name)
                addresses.add(fb.address)
                out.append(fb)
    for group in (shared, added):
        for fb in sorted(group, key=lambda fb: fb.name):
            if fb.name not in names and fb.address not in addresses:
                names.add(fb.name)
                addresses.add(fb.address)
                out.append(fb)
    return out
