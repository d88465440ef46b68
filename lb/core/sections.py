"""The config file's sections, one struct each with its own checks.

lb/core/config.py composes them into `Config`, loads files and phrases errors;
every process imports them from there.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from lb.core.values import DNS_NAME, Size, checked, is_ip, parse_address, parse_size


class Base(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class Backend(Base):
    address: str = ""  # "host:port": an IP literal, or a name that DNS discovery resolves
    weight: int = 1
    name: str = ""
    tls: bool = False  # speak TLS to this backend (verified as [upstream] tls_* say)
    sni: str = ""  # TLS: server name sent and verified; "" = the address's host
    srv: str = ""  # a DNS SRV name instead of an address: every target is a backend

    def __post_init__(self):
        if bool(self.address) == bool(self.srv):
            raise ValueError("address: give either an address or an srv name")
        if self.srv:
            if not DNS_NAME.fullmatch(self.srv):
                raise ValueError(f"srv: {self.srv!r} is not a DNS name")
        else:
            checked("address", parse_address, self.address, allow_hostname=True)
        if not 0 <= self.weight <= 1000:
            raise ValueError("weight: must be between 0 and 1000")
        if not self.name:
            self.name = self.address or self.srv
        if self.sni and not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", self.sni):
            raise ValueError("sni: must be a DNS name")

    @property
    def dynamic(self) -> bool:
        """Found by DNS discovery (an SRV name, or a host name to resolve)."""
        return bool(self.srv) or not is_ip(self.address.rpartition(":")[0])


class Discovery(Base):
    """DNS discovery of `[[backends]]` given by name (run by the admin process)."""

    resolvers: list[str] = []  # "ip" or "ip:port"; [] = the system's (resolv.conf, and /etc/hosts for names)
    interval: float = 5.0  # seconds between look-ups of one name (shorter when its records' TTL is)
    timeout: float = 2.0  # seconds for one look-up

    def __post_init__(self):
        out = []
        for r in self.resolvers:
            if not r.startswith("[") and r.count(":") != 1:  # no port: 53
                r = f"[{r}]:53" if ":" in r else f"{r}:53"
            host, port = checked("resolvers", parse_address, r, allow_hostname=False)
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        self.resolvers = out
        if not 0.5 <= self.interval <= 3600:
            raise ValueError("interval: must be between 0.5 and 3600 seconds")
        if not 0.1 <= self.timeout <= 30:
            raise ValueError("timeout: must be between 0.1 and 30 seconds")


class Admin(Base):
    listen: str = "127.0.0.1:9900"
    enabled: bool = True
    # Bearer token for the mutating endpoints; "" = read LB_ADMIN_TOKEN from the
    # environment; with neither, mutating endpoints answer 403.
    token: str = ""
    # Host names (or name:port) the admin server answers besides IP literals and
    # localhost; "*" = any.  Other Host values get 421 (DNS-rebinding protection).
    allowed_hosts: list[str] = []

    def __post_init__(self):
        checked("listen", parse_address, self.listen, allow_hostname=False)
        from lb.admin.hosts import check_entry  # the admin server's own rule

        self.allowed_hosts = [checked("allowed_hosts", check_entry, h) for h in self.allowed_hosts]


class Timeouts(Base):
    """Seconds.  Enforced by a coarse sweep (resolution `Worker.SWEEP_INTERVAL`)."""

    client_header: float = 10.0  # first byte of a request head -> end of the head
    client_body: float = 30.0  # idle time between two reads of a request body
    keepalive: float = 75.0  # idle client connection between requests
    send: float = 60.0  # client not reading what we write
    upstream_connect: float = 5.0
    upstream_response: float = 60.0  # request sent -> first byte, and between reads
    upstream_idle: float = 60.0  # pooled idle upstream connection lifetime
    tunnel_idle: float = 3600.0  # upgraded connection (WebSocket) with no byte either way
    drain: float = 30.0  # graceful stop: hard stop after this long
    heartbeat: float = 10.0  # a child process silent this long is stuck: killed and replaced

    def __post_init__(self):
        for field in self.__struct_fields__:
            if getattr(self, field) <= 0:
                raise ValueError(f"{field}: must be > 0")


class Limits(Base):
    max_request_line: Size = "8KiB"  # -> 414
    max_header_size: Size = "16KiB"  # -> 431
    max_headers: int = 100  # -> 431
    max_body_size: Size = "4GiB"  # -> 413; 0 means unlimited
    max_response_head: Size = "64KiB"  # a backend's head, 1xx ones before it included -> 502
    # Client connections per worker; at it the worker stops accepting (they wait in
    # the listen queue) until some close.  0 = computed from RLIMIT_NOFILE.
    max_connections: int = 0

    def __post_init__(self):
        self.max_request_line = checked("max_request_line", parse_size, self.max_request_line)
        self.max_response_head = checked("max_response_head", parse_size, self.max_response_head)
        if not 1024 <= self.max_response_head <= 64 * 1024 * 1024:
            raise ValueError("max_response_head: must be between 1KiB and 64MiB")
        if not 0 <= self.max_connections <= 10_000_000:
            raise ValueError("max_connections: must be between 0 (from the file descriptor "
                             "limit) and 10000000")
        self.max_header_size = checked("max_header_size", parse_size, self.max_header_size)
        self.max_body_size = checked("max_body_size", parse_size, self.max_body_size)
        if self.max_request_line < 64:
            raise ValueError("max_request_line: must be at least 64 bytes")
        if self.max_header_size < 256:
            raise ValueError("max_header_size: must be at least 256 bytes")
        if not 1 <= self.max_headers <= 10000:
            raise ValueError("max_headers: must be between 1 and 10000")


class AccessLog(Base):
    """Optional access log: JSON lines, sampled and buffered per worker."""

    path: str = ""  # "" = off
    sample: float = 1.0  # share of requests logged
    buffer: Size = "64KiB"  # flushed when full and every 0.25 s

    def __post_init__(self):
        if not 0 < self.sample <= 1:
            raise ValueError("sample: must be > 0 and <= 1")
        self.buffer = checked("buffer", parse_size, self.buffer)
        if not 512 <= self.buffer <= 64 * 1024 * 1024:
            raise ValueError("buffer: must be between 512 bytes and 64MiB")


class Upstream(Base):
    keepalive: int = 64  # idle connections kept per backend per worker
    retries: int = 1  # extra attempts on another backend (see docs/configuration.md)
    retry_connect_non_idempotent: bool = True  # a failed connect sent nothing: safe to retry
    request_id: bool = True  # add X-Request-Id when the request has none (kept when it has one)
    # TLS to backends with `tls = true`
    tls_ca: str = ""  # PEM bundle of the CAs trusted; "" = the system's
    tls_verify: bool = True  # verify the backend's certificate and name
    tls_cert: str = ""  # client certificate (PEM chain) presented to backends (mTLS); "" = none
    tls_key: str = ""  # its private key; "" = in tls_cert

    def __post_init__(self):
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key: needs tls_cert")
        if not 0 <= self.keepalive <= 10000:
            raise ValueError("keepalive: must be between 0 and 10000")
        if not 0 <= self.retries <= 5:
            raise ValueError("retries: must be between 0 and 5")


class Balancer(Base):
    ewma_decay: float = 10.0  # seconds; peak-EWMA time constant for p2c_ewma
    seed: int = 0  # 0: seeded from the OS
    slow_start: float = 10.0  # seconds over which a returning backend ramps up to its full share; 0 = off
    panic_threshold: int = 50  # percent: below this share of routable backends, route to all of them

    def __post_init__(self):
        if self.ewma_decay <= 0:
            raise ValueError("ewma_decay: must be > 0")
        if not 0 <= self.slow_start <= 3600:
            raise ValueError("slow_start: must be between 0 and 3600 seconds")
        if not 0 <= self.panic_threshold <= 100:
            raise ValueError("panic_threshold: must be between 0 and 100")


class Health(Base):
    """Active HTTP health checks, run once for the whole instance (admin process)."""

    path: str = ""  # "" = no active checks
    interval: float = 2.0  # seconds between two checks of one backend
    timeout: float = 1.0
    rise: int = 2  # consecutive passes to mark a down backend up
    fall: int = 3  # consecutive failures to mark an up backend down
    expect_status: list[int] = []  # [] = any 2xx or 3xx
    host: str = ""  # Host header; "" = the backend's address

    def __post_init__(self):
        if self.path and not self.path.startswith("/"):
            raise ValueError("path: must start with '/'")
        if not 0.05 <= self.interval <= 3600:
            raise ValueError("interval: must be between 0.05 and 3600 seconds")
        if not 0 < self.timeout <= self.interval:
            raise ValueError("timeout: must be > 0 and at most interval")
        if not 1 <= self.rise <= 100 or not 1 <= self.fall <= 100:
            raise ValueError("rise/fall: must be between 1 and 100")
        for st in self.expect_status:
            if not 100 <= st <= 599:
                raise ValueError(f"expect_status: {st} is not an HTTP status")


class Outlier(Base):
    """Passive outlier detection from real traffic, in each worker."""

    consecutive_failures: int = 5  # 5xx or failed connects in a row -> eject; 0 = off
    base_ejection: float = 10.0  # seconds; the n-th ejection in a row lasts n x this
    max_ejection: float = 300.0  # seconds, cap
    max_ejected_percent: int = 50  # never eject more than this share of the backends

    def __post_init__(self):
        if not 0 <= self.consecutive_failures <= 10000:
            raise ValueError("consecutive_failures: must be between 0 and 10000")
        if self.base_ejection <= 0 or self.max_ejection < self.base_ejection:
            raise ValueError("base_ejection/max_ejection: need 0 < base_ejection <= max_ejection")
        if not 0 <= self.max_ejected_percent <= 100:
            raise ValueError("max_ejected_percent: must be between 0 and 100")


class Protection(Base):
    """Circuit breaking, load shedding and rate limiting.  Limits are for the
    whole instance; each worker enforces its even share (see docs)."""

    max_inflight: int = 0  # requests in flight to backends -> 503 beyond; 0 = no cap
    backend_max_connections: int = 0  # concurrent requests to one backend -> another or 503; 0 = no cap
    backend_max_pending: int = 0  # requests waiting for a new connection to one backend; 0 = no cap
    rate_limit: float = 0.0  # requests per second per client IP -> 429 beyond; 0 = off
    rate_burst: int = 0  # bucket size; 0 = one second's worth
    retry_after: int = 1  # seconds, sent with 429 and 503

    def __post_init__(self):
        for field in ("max_inflight", "backend_max_connections", "backend_max_pending", "rate_burst"):
            if not 0 <= getattr(self, field) <= 10_000_000:
                raise ValueError(f"{field}: must be between 0 and 10000000")
        if self.rate_limit < 0:
            raise ValueError("rate_limit: must be >= 0")
        if not 0 <= self.retry_after <= 3600:
            raise ValueError("retry_after: must be between 0 and 3600")


class RequestClass(Base):
    """A rule mapping requests to a class; the first matching rule wins and
    requests no rule matches are class "default"."""

    name: str
    methods: list[str] = []  # [] = any method
    path_prefix: str = ""  # "" = any path
    min_body: Size = 0  # declared Content-Length at least this (chunked counts as large)
    max_body: Size = 0  # at most this; 0 = no upper bound

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise ValueError("name: use 1-64 letters, digits, '_', '.', '-'")
        if self.name == "default":
            raise ValueError("name: 'default' is the implicit class of unmatched requests")
        self.methods = [m.upper() for m in self.methods]
        for m in self.methods:
            if not re.fullmatch(r"[A-Z]{1,20}", m):
                raise ValueError(f"methods: invalid method {m!r}")
        if self.path_prefix and not self.path_prefix.startswith("/"):
            raise ValueError("path_prefix: must start with '/'")
        self.min_body = checked("min_body", parse_size, self.min_body)
        self.max_body = checked("max_body", parse_size, self.max_body)
        if self.max_body and self.max_body < self.min_body:
            raise ValueError("max_body: must be >= min_body (or 0 for no bound)")


TLS_CIPHERS = (  # TLS 1.2: forward secret AEAD suites only (no RSA key exchange, no CBC)
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


class Certificate(Base):
    cert: str  # PEM chain, leaf first
    key: str  # PEM private key
    names: list[str] = []  # SNI names it serves; [] = the names in the certificate

    def __post_init__(self):
        for n in self.names:
            if not re.fullmatch(r"(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*", n):
                raise ValueError(f"names: {n!r} is not a DNS name (or *.wildcard)")


class TLS(Base):
    """The HTTPS listener (see docs/configuration.md); off while `listen` is ""."""

    listen: str = ""
    certificates: list[Certificate] = []  # picked by SNI; the first is the default
    min_version: Literal["1.2", "1.3"] = "1.2"
    ciphers: str = TLS_CIPHERS  # TLS 1.2 suites, OpenSSL syntax (TLS 1.3 suites are all AEAD)
    handshake_timeout: float = 10.0  # seconds from accept to a finished handshake
    session_tickets: bool = True  # resumption; ticket keys shared by all workers, rotated
    ticket_rotation: float = 3600.0  # seconds a ticket key encrypts new tickets (accepted twice as long)
    redirect_http: bool = False  # the plain listener answers every request with a redirect here
    redirect_port: int = 0  # the port in those redirects; 0 = listen's (443 is left out)
    proxy_protocol: bool = False  # connections open with a PROXY protocol header (v1 or v2)

    def __post_init__(self):
        if not self.listen:
            if self.certificates or self.redirect_http:
                raise ValueError("listen: required with certificates or redirect_http")
            return
        checked("listen", parse_address, self.listen, allow_hostname=False)
        if not self.certificates:
            raise ValueError("certificates: at least one [[tls.certificates]] entry is required")
        if not 0 < self.handshake_timeout <= 600:
            raise ValueError("handshake_timeout: must be > 0 and at most 600 seconds")
        if not 60 <= self.ticket_rotation <= 7 * 86400:
            raise ValueError("ticket_rotation: must be between 60 seconds and 7 days")
        if not self.ciphers.strip():
            raise ValueError("ciphers: must not be empty")
        if not 0 <= self.redirect_port <= 65535:
            raise ValueError("redirect_port: must be between 0 (listen's port) and 65535")


class Fleet(Base):
    """Several lb hosts sharing one etcd (lb/admin/etcd.py)."""

    etcd: list[str] = []  # "http://host:port" endpoints of one etcd cluster; [] = no fleet
    prefix: str = "/lb"  # backends under PREFIX/backends/NAME, members under PREFIX/members/ID
    member: str = ""  # this member's id; "" = host name and admin port
    lease_ttl: float = 5.0  # seconds: a member that stops refreshing leaves the list after this

    def __post_init__(self):
        for url in self.etcd:
            m = re.fullmatch(r"http://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})/?", url)
            if not m or not 0 < int(m.group(2)) < 65536:
                raise ValueError(f"etcd: {url!r} is not an endpoint like 'http://127.0.0.1:2379' "
                                 "(https endpoints are not supported)")
        if not re.fullmatch(r"/[A-Za-z0-9._/-]*[A-Za-z0-9._-]", self.prefix):
            raise ValueError(f"prefix: {self.prefix!r} must start with '/' and not end with one")
        if self.member and not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", self.member):
            raise ValueError("member: 1-128 characters of letters, digits and . _ : -")
        if not 2 <= self.lease_ttl <= 300:
            raise ValueError("lease_ttl: must be between 2 and 300 seconds")


class Capacity(Base):
    """Capacity estimates and scaling advice (GET /api/capacity)."""

    slo_p99_ms: float = 250.0  # the latency objective a backend's capacity is measured against
    headroom: float = 0.25  # spare capacity the recommendation keeps over the forecast's high end
    explore: float = 0.0  # share of ml's picks that may measure a backend's slot count (workers/probe.py); 0 = off

    def __post_init__(self):
        if not 1 <= self.slo_p99_ms <= 600_000:
            raise ValueError("slo_p99_ms: must be between 1 and 600000")
        if not 0 <= self.headroom <= 10:
            raise ValueError("headroom: must be between 0 and 10")
        if not 0 <= self.explore <= 0.05:
            raise ValueError("explore: must be between 0 and 0.05")


class Learning(Base):
    """The inference process and the `ml` strategy (see docs/learning.md)."""

    model: str = ""  # path to an .onnx model; "" = the model shipped with lb
    interval: float = 0.1  # seconds between two scoring ticks (tables)
    stats_interval: float = 0.1  # seconds between two worker stats reports
    exploration: float = 0.005  # share of ml's picks that may go to a backend not heard from lately
    max_prediction_error: float = 0.8  # online mean |ln(observed/predicted)| above this -> fallback
    # how far the model's error predictions price the picks: "earned" (as far as their record
    # against the cells' own has earned it, per backend) or "always" (shrunk towards the record only)
    model_errors: str = "earned"
    traces: str = ""  # directory for sampled request traces; "" = no capture
    trace_sample: float = 0.02  # share of requests sampled (sent with the stats, no per-request IPC)
    retrain_interval: float = 0.0  # seconds between background refits; 0 = off
    guard_share: float = 0.02  # share of ml's picks routed by the other arm (P2C-EWMA) to judge it; 0 = off

    def __post_init__(self):
        if not 0.01 <= self.interval <= 10:
            raise ValueError("interval: must be between 0.01 and 10 seconds")
        if not 0.01 <= self.stats_interval <= 10:
            raise ValueError("stats_interval: must be between 0.01 and 10 seconds")
        if not 0 <= self.exploration <= 0.5:
            raise ValueError("exploration: must be between 0 and 0.5")
        if self.max_prediction_error <= 0:
            raise ValueError("max_prediction_error: must be > 0")
        if self.model_errors not in ("earned", "always"):
            raise ValueError(f"model_errors: must be \"earned\" or \"always\", not {self.model_errors!r}")
        if not 0 <= self.trace_sample <= 1:
            raise ValueError("trace_sample: must be between 0 and 1")
        if self.retrain_interval < 0:
            raise ValueError("retrain_interval: must be >= 0")
        if not 0 <= self.guard_share <= 0.2:
            raise ValueError("guard_share: must be between 0 and 0.2")
