"""Which `Host` values the admin server answers (DNS-rebinding protection).

A page on a name the attacker controls can make a browser resolve that name
to 127.0.0.1 (DNS rebinding) and then read the admin API as same-origin.  The
browser still sends the attacker's name in `Host`, so the admin process only
answers requests whose Host is:

  * an IP literal (`127.0.0.1:9900`, `[::1]:9900`, `10.0.0.5:9900`): an
    address cannot be rebound, and a page served from that origin is the
    admin itself.  Any port: the admin may sit behind a port mapping
    (`docker run -p 19900:9900`);
  * `localhost` (any port): it never resolves through an attacker's DNS;
  * a name from `[admin] allowed_hosts`: `name` for any port, `name:port`
    for that port only, `*` for any Host at all.

A request without Host (HTTP/1.0) is answered: browsers always send one.
"""

from __future__ import annotations

import ipaddress
import re

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


def split_host(value: str) -> tuple[str, str] | None:
    """'Name:port' / '[v6]:port' / 'name' -> (lower-case host, port or ''); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        host = f"[{host}]"
    else:
        host, _, port = value.partition(":")
    if port and not (port.isascii() and port.isdigit() and len(port) <= 5):
        return None
    host = host[:-1] if host.endswith(".") else host  # "localhost." is "localhost"
    if not host:
        return None
    return host, port


def is_ip_literal(host: str) -> bool:
    if host.startswith("["):
        return True  # split_host checked it
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def check_entry(entry: str) -> str:
    """Validate one `allowed_hosts` entry; returns it lower-cased (ValueError if invalid)."""
    if entry == "*":
        return entry
    parts = split_host(entry)
    if parts is None or not (is_ip_literal(parts[0]) or _NAME.match(parts[0])):
        raise ValueError(f"invalid host {entry!r} (expected a name, name:port or '*')")
    return entry.strip().lower()


class HostCheck:
    """Answers whether a request's Host header is one this admin server serves."""

    def __init__(self, allowed: list[str]) -> None:
        self.any = "*" in allowed
        self.names: set[str] = set()  # any port
        self.exact: set[tuple[str, str]] = set()  # (name, port)
        for entry in allowed:
            parts = split_host(entry) if entry != "*" else None
            if parts is None:
                continue
            if parts[1]:
                self.exact.add(parts)
            else:
                self.names.add(parts[0])

    def allows(self, host: str | None) -> bool:
        if host is None or self.any:
            return True
        parts = split_host(host)
        if parts is None:
            return False
        name, _port = parts
        if name == "localhost" or is_ip_literal(name):
            return True
        return name in self.names or parts in self.exact
