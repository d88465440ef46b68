"""Typed configuration: TOML decoded and validated with msgspec.

Each section is one struct (lb/core/sections.py, with the value parsers of
lb/core/values.py), the single source of truth for it; this module composes them
into `Config`, loads files and phrases errors, and every process imports the
structs from here.  The worker processes receive the validated `Config`
encoded as msgpack, so they never parse TOML themselves.  Errors are raised
as `ConfigError`, which names the file and the field and is printed by the
CLI as one line (exit code 2).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from typing import Literal

import msgspec

from lb.core.sections import (  # noqa: F401 - the sections, imported from here by every process
    AccessLog,
    Admin,
    Backend,
    Balancer,
    Base,
    Capacity,
    Certificate,
    Discovery,
    Fleet,
    Health,
    Learning,
    Limits,
    Outlier,
    Protection,
    RequestClass,
    Timeouts,
    TLS,
    TLS_CIPHERS,
    Upstream,
)
from lb.core.values import Size, checked, is_ip, parse_address, parse_size, same_address  # noqa: F401

FLEET_FILE = "backends.json"  # in state_dir: the API's backends and the last DNS answers (lb/admin/fleet.py)

STRATEGIES = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "random",
    "p2c_ewma",
    "prequal",
    "ml",
)
Strategy = Literal[
    "round_robin", "weighted_round_robin", "least_connections", "random", "p2c_ewma", "prequal", "ml"
]


class ConfigError(Exception):
    """A configuration problem, phrased for one line of output."""

    def __init__(self, path: str, field: str | None, message: str):
        self.path = path
        self.field = field
        self.message = message
        where = f"{path}: {field}: " if field else f"{path}: "
        super().__init__(where + message)


class Config(Base):
    backends: list[Backend] = []
    listen: str = "127.0.0.1:8080"
    strategy: Strategy = "p2c_ewma"
    workers: int = 1
    backlog: int = 2048
    proxy_protocol: bool = False  # plain listener: connections open with a PROXY protocol header
    admin: Admin = msgspec.field(default_factory=Admin)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    limits: Limits = msgspec.field(default_factory=Limits)
    upstream: Upstream = msgspec.field(default_factory=Upstream)
    balancer: Balancer = msgspec.field(default_factory=Balancer)
    learning: Learning = msgspec.field(default_factory=Learning)
    health: Health = msgspec.field(default_factory=Health)
    outlier: Outlier = msgspec.field(default_factory=Outlier)
    protection: Protection = msgspec.field(default_factory=Protection)
    access_log: AccessLog = msgspec.field(default_factory=AccessLog)
    tls: TLS = msgspec.field(default_factory=TLS)
    capacity: Capacity = msgspec.field(default_factory=Capacity)
    discovery: Discovery = msgspec.field(default_factory=Discovery)
    fleet: Fleet = msgspec.field(default_factory=Fleet)
    classes: list[RequestClass] = []
    runtime_dir: str = ""  # ipc sockets between lb's processes; "" = a private temp dir
    # backends added through the admin API, the last DNS answers, the load history;
    # "" = the runtime directory (kept across lb restarts only when that is configured)
    state_dir: str = ""

    def __post_init__(self):
        checked("listen", parse_address, self.listen, allow_hostname=False)
        if not 1 <= self.workers <= 256:
            raise ValueError("workers: must be between 1 and 256")
        if not 1 <= self.backlog <= 65535:
            raise ValueError("backlog: must be between 1 and 65535")
        if not self.backends and not self.fleet.etcd:
            raise ValueError("backends: at least one [[backends]] entry is required (or a [fleet] etcd)")
        seen: set[str] = set()
        for b in self.backends:
            if b.name in seen:
                raise ValueError(f"backends: duplicate backend name {b.name!r}")
            seen.add(b.name)
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError("classes: duplicate class name")
        if len(self.classes) > 63:
            raise ValueError("classes: at most 63 classes")
        if self.tls.listen and same_address(self.tls.listen, self.listen):
            raise ValueError("tls.listen: must differ from listen")
        if len(self.runtime_dir) > 80:
            raise ValueError("runtime_dir: path too long for ipc sockets (80 characters at most)")
        if not self.admin.enabled and any(b.srv for b in self.backends):
            raise ValueError("backends: srv: DNS discovery runs in the admin process (admin.enabled = true)")
        if not self.admin.enabled and self.fleet.etcd:
            raise ValueError("fleet: etcd: the fleet member runs in the admin process (admin.enabled = true)")

    @property
    def discovers(self) -> bool:
        """The admin process resolves backends given by name and publishes the
        fleet; without it, a worker resolves a name each time it connects."""
        return self.admin.enabled

    def fleet_file(self, runtime_dir: str) -> str:
        """Where the admin process keeps the backends it added or discovered."""
        return os.path.join(self.state_dir or runtime_dir, FLEET_FILE)

    def static_backends(self) -> list[Backend]:
        """The backends a worker starts with, before the admin's fleet arrives."""
        if not self.discovers:
            return list(self.backends)
        return [b for b in self.backends if not b.dynamic]

    @property
    def class_names(self) -> list[str]:
        return ["default"] + [c.name for c in self.classes]


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


def _non_finite(data, prefix: str = "") -> str | None:
    """The first field holding nan or inf (TOML allows both): a timeout of nan
    compares false with every clock reading, so it would never fire."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        name = f"{prefix}[{key}]" if isinstance(key, int) else (f"{prefix}.{key}" if prefix else str(key))
        if isinstance(value, float) and not math.isfinite(value):
            return name
        found = _non_finite(value, name)
        if found:
            return found
    return None


def from_dict(data: dict, path: str = "<config>") -> Config:
    bad = _non_finite(data)
    if bad:
        raise ConfigError(path, bad, "must be a finite number")
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


def check_paths(cfg: Config, path: str) -> None:
    """Files lb will write: fail now, naming the field, rather than at worker boot."""
    if cfg.access_log.path:
        try:
            os.close(os.open(cfg.access_log.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
        except OSError as exc:
            raise ConfigError(path, "access_log.path",
                              f"cannot open {cfg.access_log.path}: {exc.strerror or exc}") from None


def encode(cfg: Config) -> bytes:
    return msgspec.msgpack.encode(cfg)


def decode(blob: bytes) -> Config:
    return msgspec.msgpack.decode(blob, type=Config)
