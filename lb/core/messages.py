"""Every message that crosses a process boundary, as msgspec structs.

Transport is ZeroMQ over ipc:// endpoints in the instance's runtime directory;
each message is two frames, [topic, msgpack payload].  No message is ever sent
per request: workers aggregate and report every `learning.stats_interval`.

    worker  --PUB stats-------->  inference (SUB, bind)   topic b"stats"
                          \\--->  admin     (SUB, bind)   topic b"stats"
    supervisor --PUB status--->  admin                   topic b"status"
    inference --PUB tables---->  workers, admin           topic b"table"
    inference --ROUTER snapshot   (Clone pattern: subscribe, ask for a
                                   snapshot, drop updates older than it)
    admin     --PUB control--->  workers, inference       topic b"control"
                                  (overrides, health verdicts, the fleet)
    admin     --ROUTER snapshot

Counters in `WorkerStats` are cumulative since the worker started: a lost
message loses no count, and a receiver computes rates from differences.
"""

from __future__ import annotations

import os

import msgspec

# Upper bounds (seconds) of the latency histogram buckets; the last bucket is
# everything above the last bound.  Shared by workers, inference and /metrics.
LATENCY_BOUNDS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)
N_BUCKETS = len(LATENCY_BOUNDS) + 1

TOPIC_STATS = b"stats"
TOPIC_STATUS = b"status"
TOPIC_TABLE = b"table"
TOPIC_CONTROL = b"control"
SNAPSHOT_REQUEST = b"SNAP"


def endpoints(runtime_dir: str) -> dict[str, str]:
    """The ipc:// endpoints of one lb instance (all bound by their owners)."""
    d = os.path.abspath(runtime_dir)
    return {
        "stats_inference": f"ipc://{d}/stats-inference",
        "stats_admin": f"ipc://{d}/stats-admin",
        "tables": f"ipc://{d}/tables",
        "tables_snapshot": f"ipc://{d}/tables-snapshot",
        "control": f"ipc://{d}/control",
        "control_snapshot": f"ipc://{d}/control-snapshot",
    }


class Msg(msgspec.Struct, omit_defaults=True):
    pass


# -- worker -> inference, admin ---------------------------------------------------


class BackendStats(Msg, array_like=True):
    """One backend as one worker saw it.  Per-class lists are indexed like
    `WorkerStats.classes`; histograms like `LATENCY_BOUNDS` (+1 overflow)."""

    name: str
    weight: int
    requests: int  # dispatched (retries included)
    responses: list[int]  # by status class: [no response, 1xx, 2xx, 3xx, 4xx, 5xx]
    connect_errors: int
    timeouts: int
    retries: int
    resets: int
    inflight: int  # gauge
    idle: int  # gauge: idle pooled connections
    ewma: float  # gauge: this worker's peak-EWMA latency (seconds)
    class_responses: list[int]  # outcomes (response heads + failures without one), per class
    class_errors: list[int]  # 5xx heads + failures without a response, per class
    class_latency_sum: list[float]  # seconds, per class
    class_latency: list[list[int]]  # histogram of time to response head, per class
    unavailable: bool = False  # gauge: not routed to (drained, down, ejected; not in panic)
    ramp: float = 1.0  # gauge: slow start, share of picks kept (1 = full)
    ejections: int = 0  # passive outlier ejections by this worker
    overflows: int = 0  # requests turned away by this backend's circuit breaker
    # The response heads since the last report, for the admin's load curves
    # (lb/admin/loadcurves.py): float64 triples (class, or -1 - class for a
    # 5xx; time.monotonic() when the request was sent; seconds to the head).
    sends: bytes = b""
    sends_lost: bool = False  # more than workers.backend.SENT_MAX since the last report: some left out


class TraceSample(Msg, array_like=True):
    """One sampled request: routed with table `table_seq` to backend `backend`
    (index in WorkerStats.backends), request class `cls`, and its outcome."""

    table_epoch: int
    table_seq: int
    backend: int
    cls: int
    latency: float  # seconds to the response head (or to the failure)
    ok: bool  # False: 5xx or no response


class WorkerStats(Msg):
    slot: int
    pid: int
    generation: int
    seq: int  # per worker, +1 per message
    ts: float  # time.time() when sent
    classes: list[str]
    backends: list[BackendStats]
    connections: int  # gauge: client connections open
    accepted: int
    requests: int
    rejected: int  # 4xx produced by lb itself (malformed or over limits)
    timeouts: int
    no_backend: int  # 503: nothing to route to
    shed: int = 0  # 503 by a protection limit
    abandoned: int = 0  # requests whose client went away while waiting for the backend's answer
    limited: int = 0  # 429 by the per-client rate limit
    proxy_errors: int = 0  # connections closed for a missing or bad PROXY protocol header
    tls_handshakes: int = 0  # completed on the HTTPS listener
    tls_failures: dict[str, int] = {}  # failed handshakes by reason (lb/core/tls.py)
    panic: bool = False  # gauge: too few healthy backends, routing to all routable ones
    strategy: str = ""  # the strategy in force
    mode: str = ""  # ml only: "learned" or "fallback"
    mode_reason: str = ""  # why fallback: no_table, stale, inference_fallback, ...
    table_seq: int = 0
    table_age: float = -1.0  # seconds; -1: no table
    traces: list[TraceSample] = []


# -- supervisor -> admin --------------------------------------------------------------


class SupervisorStatus(Msg):
    ts: float
    pid: int
    generation: int  # the running config generation
    workers_expected: int
    workers_ready: int
    worker_restarts: int
    reloads: int  # completed
    reloads_failed: int
    inference_up: bool
    inference_restarts: int
    config_path: str
    strategy: str
    config: bytes = b""  # the running lb.core.config.Config, msgpack (changes on reload)
    runtime_dir: str = ""


# -- inference -> workers, admin ----------------------------------------------------------


class Table(Msg):
    """A routing table.  `weights[c][b]` is the share of class `c` traffic that
    should go to backend `backends[b]`; every live backend keeps a floor share."""

    epoch: int  # publisher incarnation (random); a new epoch resets sequencing
    seq: int  # +1 per table within an epoch
    ts: float  # time.time() when computed
    interval: float  # publish interval (staleness is judged against 2x this)
    model_version: str
    mode: str  # "learned" | "fallback"
    reason: str  # why fallback ("" when learned)
    backends: list[str]
    classes: list[str]
    weights: list[list[float]]  # [class][backend], each row sums to 1
    latency: list[list[float]] = []  # predicted seconds, [class][backend]
    error: list[list[float]] = []  # predicted error probability, [class][backend]
    prediction_error: float = -1.0  # online error of the model (mean |log ratio|); -1 unknown
    tick_seconds: float = 0.0  # time the last scoring tick took
    # Price (seconds) of a request of class c at backend b: the predicted latency
    # penalised by the error probability (the prediction shrunk towards what the
    # backend did).  Workers read the priced error back from cost / latency, and the
    # latency as the service time of classes their load curves have not seen yet.
    cost: list[list[float]] = []  # [class][backend]; [] = no penalty
    exploration: float = 0.0  # share of picks that may go to a backend not heard from lately
    # per backend, the weight of the model's error predictions in the priced error (as far as
    # they foretold its failures better than its record: inference/policy.py ErrorRecord);
    # [] = none priced, or `learning.model_errors = "always"` (weight 1)
    error_weight: list[float] = []


# -- admin -> workers, inference ------------------------------------------------------------


class FleetBackend(Msg, array_like=True):
    """One backend of the instance's fleet (lb/admin/fleet.py)."""

    name: str
    address: str  # "ip:port" or "[v6]:port"
    weight: int
    tls: bool = False
    sni: str = ""  # TLS server name ("" = the address's host)
    source: str = "config"  # config | dns | etcd | api


class Control(Msg):
    """Operator overrides, shared health and the fleet, published by the admin process."""

    epoch: int
    seq: int
    ts: float
    drained: list[str] = []  # backends taken out of rotation by an operator
    pinned_strategy: str = ""  # "" = the config's strategy
    down: list[str] = []  # backends failing their active health checks
    # The fleet beyond the config file: the last DNS answers per `[[backends]]`
    # entry name, the backends added through the API, those in etcd.  Each receiver
    # composes them with its own config (lb/core/fleet.py) and applies the result in
    # place (no reload); with `fleet_known` False it keeps the config's backends.
    discovered: dict[str, list[FleetBackend]] = {}
    added: list[FleetBackend] = []
    shared: list[FleetBackend] = []  # the fleet's backends in etcd ([fleet])
    fleet_known: bool = False
    # The fleet's learned model (lb/admin/modelshare.py): `trains` is False on a
    # member that is not the fleet's leader (it adopts models instead of fitting
    # its own); `shared_model` is the file, in the runtime directory, of the
    # latest version the leader published, `shared_from` the member it came from.
    trains: bool = True
    shared_model: str = ""
    shared_version: str = ""
    shared_from: str = ""


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


_encoder = msgspec.msgpack.Encoder()
stats_decoder = msgspec.msgpack.Decoder(WorkerStats)
status_decoder = msgspec.msgpack.Decoder(SupervisorStatus)
table_decoder = msgspec.msgpack.Decoder(Table)
control_decoder = msgspec.msgpack.Decoder(Control)

# A Table whose per-class rows are left as their msgpack bytes, for the workers (below)
TABLE_ROWS = ("weights", "latency", "error", "cost")
_EMPTY_ROWS = msgspec.Raw(b"\x90")


def _raw_rows_field(f: msgspec.structs.FieldInfo) -> tuple:
    if f.name in TABLE_ROWS:
        return (f.name, msgspec.Raw) if f.required else (f.name, msgspec.Raw, _EMPTY_ROWS)
    if f.required:
        return (f.name, f.type)
    if f.default_factory is not msgspec.NODEFAULT:
        return (f.name, f.type, msgspec.field(default_factory=f.default_factory))
    return (f.name, f.type, f.default)


_TableRawRows = msgspec.defstruct("_TableRawRows", [_raw_rows_field(f) for f in msgspec.structs.fields(Table)],
                                  omit_defaults=True)
_table_raw_rows_decoder = msgspec.msgpack.Decoder(_TableRawRows)
_rows_decoder = msgspec.msgpack.Decoder(list[list[float]])


def decode_table_arrays(payload: bytes) -> Table:
    """A Table as a worker reads it: its per-class rows (TABLE_ROWS) as
    (classes, backends) float64 numpy arrays, read from their bytes in one
    step where every row is full and every value a 64-bit float, as the
    inference process sends them (lb/core/floatrows.py; about 0.1 ms less of
    a worker's event loop per table at 256 backends x 8 classes), else as
    lists, decoded and checked as `table_decoder` would.  Such a Table is
    read, never encoded again."""
    from lb.core.floatrows import float_rows  # (numpy: only for the processes that read tables so)

    raw = _table_raw_rows_decoder.decode(payload)
    values = {name: getattr(raw, name) for name in raw.__struct_fields__}
    for name in TABLE_ROWS:
        rows = float_rows(values[name])
        values[name] = rows if rows is not None else _rows_decoder.decode(values[name])
    return Table(**values)


def bucket_index(seconds: float) -> int:
    """Histogram bucket of a latency (bisect over LATENCY_BOUNDS)."""
    from bisect import bisect_left

    return bisect_left(LATENCY_BOUNDS, seconds)
