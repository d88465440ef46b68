"""Typed configuration: TOML decoded and validated with msgspec.

Every struct here is the single source of truth for one config section; the
worker processes receive the validated `Config` encoded as msgpack, so they
never parse TOML themselves.  Errors are raised as `ConfigError`, which names
the file and the field and is printed by the CLI as one line (exit code 2).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from typing import Literal, Union

import msgspec

STRATEGIES = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "random",
    "p2c_ewma",
    "ml",
)
Strategy = Literal[
    "round_robin", "weighted_round_robin", "least_connections", "random", "p2c_ewma", "ml"
]

# Sizes may be written as integers (bytes) or as strings such as "16KiB" / "2GiB".
Size = Union[int, str]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class ConfigError(Exception):
    """A configuration problem, phrased for one line of output."""

    def __init__(self, path: str, field: str | None, message: str):
        self.path = path
        self.field = field
        self.message = message
        where = f"{path}: {field}: " if field else f"{path}: "
        super().__init__(where + message)


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


class Base(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


def _checked(field: str, fn, *args, **kw):
    """Run a parser; its ValueError is re-raised as 'field: message'."""
    try:
        return fn(*args, **kw)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None


class Backend(Base):
    address: str
    weight: int = 1
    name: str = ""

    def __post_init__(self):
        _checked("address", parse_address, self.address, allow_hostname=True)
        if not 0 <= self.weight <= 1000:
            raise ValueError("weight: must be between 0 and 1000")
        if not self.name:
            self.name = self.address


class Admin(Base):
    listen: str = "127.0.0.1:9900"

    def __post_init__(self):
        _checked("listen", parse_address, self.listen, allow_hostname=False)


class Timeouts(Base):
    """Seconds.  Enforced by a coarse sweep (resolution `Worker.SWEEP_INTERVAL`)."""

    client_header: float = 10.0  # first byte of a request head -> end of the head
    client_body: float = 30.0  # idle time between two reads of a request body
    keepalive: float = 75.0  # idle client connection between requests
    send: float = 60.0  # client not reading what we write
    upstream_connect: float = 5.0
    upstream_response: float = 60.0  # request sent -> first byte, and between reads
    upstream_idle: float = 60.0  # pooled idle upstream connection lifetime
    drain: float = 30.0  # graceful stop: hard stop after this long

    def __post_init__(self):
        for field in self.__struct_fields__:
            if getattr(self, field) <= 0:
                raise ValueError(f"{field}: must be > 0")


class Limits(Base):
    max_request_line: Size = "8KiB"  # -> 414
    max_header_size: Size = "16KiB"  # -> 431
    max_headers: int = 100  # -> 431
    max_body_size: Size = "4GiB"  # -> 413; 0 means unlimited

    def __post_init__(self):
        self.max_request_line = _checked("max_request_line", parse_size, self.max_request_line)
        self.max_header_size = _checked("max_header_size", parse_size, self.max_header_size)
        self.max_body_size = _checked("max_body_size", parse_size, self.max_body_size)
        if self.max_request_line < 64:
            raise ValueError("max_request_line: must be at least 64 bytes")
        if self.max_header_size < 256:
            raise ValueError("max_header_size: must be at least 256 bytes")
        if not 1 <= self.max_headers <= 10000:
            raise ValueError("max_headers: must be between 1 and 10000")


class Upstream(Base):
    keepalive: int = 64  # idle connections kept per backend per worker
    retries: int = 1  # extra attempts on another backend (see docs/configuration.md)
    retry_connect_non_idempotent: bool = True  # a failed connect sent nothing: safe to retry

    def __post_init__(self):
        if not 0 <= self.keepalive <= 10000:
            raise ValueError("keepalive: must be between 0 and 10000")
        if not 0 <= self.retries <= 5:
            raise ValueError("retries: must be between 0 and 5")


class Balancer(Base):
    ewma_decay: float = 10.0  # seconds; peak-EWMA time constant for p2c_ewma
    seed: int = 0  # 0: seeded from the OS

    def __post_init__(self):
        if self.ewma_decay <= 0:
            raise ValueError("ewma_decay: must be > 0")


class Config(Base):
    backends: list[Backend]
    listen: str = "127.0.0.1:8080"
    strategy: Strategy = "p2c_ewma"
    workers: int = 1
    backlog: int = 2048
    admin: Admin = msgspec.field(default_factory=Admin)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    limits: Limits = msgspec.field(default_factory=Limits)
    upstream: Upstream = msgspec.field(default_factory=Upstream)
    balancer: Balancer = msgspec.field(default_factory=Balancer)

    def __post_init__(self):
        _checked("listen", parse_address, self.listen, allow_hostname=False)
        if not 1 <= self.workers <= 256:
            raise ValueError("workers: must be between 1 and 256")
        if not 1 <= self.backlog <= 65535:
            raise ValueError("backlog: must be between 1 and 65535")
        if not self.backends:
            raise ValueError("backends: at least one [[backends]] entry is required")
        seen: set[str] = set()
        for b in self.backends:
            if b.name in seen:
                raise ValueError(f"backends: duplicate backend name {b.name!r}")
            seen.add(b.name)


_FIELD_PREFIX = re.compile(r"^([a-z_]+): (.*)$", re.DOTALL)
_PATH_RE = re.compile(r" - at `\$\.?(.*)`$")


def _split_error(message: str) -> tuple[str | None, str]:
    m = _PATH_RE.search(message)
    if not m:
        return None, message
    field = m.group(1) or None
    return field, message[: m.start()]


def _humanize(message: str) -> str:
    return message.replace("`", "")


def from_dict(data: dict, path: str = "<config>") -> Config:
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        field, msg = _split_error(str(exc))
        m = _FIELD_PREFIX.match(msg)
        if m:  # raised by a __post_init__ check as 'field: message'
            field = f"{field}.{m.group(1)}" if field else m.group(1)
            msg = m.group(2)
        if msg.startswith("Object missing required field"):
            name = msg.split("`")[1]
            field = f"{field}.{name}" if field else name
            msg = "required field is missing"
        elif msg.startswith("Invalid enum value") and field == "strategy":
            msg += " (expected one of: " + ", ".join(STRATEGIES) + ")"
        elif msg.startswith("Object contains unknown field"):
            name = msg.split("`")[1]
            field = f"{field}.{name}" if field else name
            msg = "unknown field"
        raise ConfigError(path, field, _humanize(msg)) from None


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(path, None, exc.strerror or str(exc)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, None, f"invalid TOML: {exc}") from None
    return from_dict(data, path)


def encode(cfg: Config) -> bytes:
    return msgspec.msgpack.encode(cfg)


def decode(blob: bytes) -> Config:
    return msgspec.msgpack.decode(blob, type=Config)
