"""Values as the config file writes them: sizes (bytes, or "16KiB", "2GiB"),
addresses ("host:port", "[v6]:port"), DNS names; and `checked`, which puts
the field's name in front of what a parser rejected."""

from __future__ import annotations

import ipaddress
import re
from typing import Union

# Sizes may be written as integers (bytes) or as strings such as "16KiB" / "2GiB".
Size = Union[int, str]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: Size) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes or a string like '16KiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"invalid size {value!r} (use bytes or e.g. '16KiB', '2GiB')")
    unit = (m.group(2) or "").lower()[:1]
    return int(m.group(1)) * _UNITS[unit]


def parse_address(value: str, *, allow_hostname: bool) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"invalid address {value!r} (expected '[v6addr]:port')")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address in {value!r}") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"invalid address {value!r} (expected 'host:port')")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not allow_hostname or not re.fullmatch(r"[A-Za-z0-9.-]+", host):
                raise ValueError(f"invalid host in {value!r}") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid port in {value!r} (1-65535)")
    return host, int(port)


def same_address(a: str, b: str) -> bool:
    """Two listen addresses name the same socket ('[::]:80' and '[::0]:80' do)."""
    (ha, pa), (hb, pb) = parse_address(a, allow_hostname=False), parse_address(b, allow_hostname=False)
    return pa == pb and ipaddress.ip_address(ha) == ipaddress.ip_address(hb)


def checked(field: str, fn, *args, **kw):
    """Run a parser; its ValueError is re-raised as 'field: message'."""
    try:
        return fn(*args, **kw)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None


DNS_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False
