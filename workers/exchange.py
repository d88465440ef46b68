"""One request in flight, from its parsed head to the last byte of its response.

The exchange is the contract between the two sides of the proxy.  The
downstream side (workers/downstream.py, the client connection) creates it
from a parsed head and answers requests in order; the dispatcher
(workers/dispatch.py, one per worker) binds it to a backend and an upstream
connection; the upstream side (workers/upstream.py) knows nothing of the
client connection and calls only these (typed in workers/contract.py):

    client.write(data)     response bytes for the client (its transport, write only)
    pause_client()         the upstream's send buffer is full: stop reading the client
    resume_client()        ... and read again
    complete()             the response ended: next request, or close
    failed(...)            no response byte came back: retry elsewhere, or an error answer
    answer_error(status)   the backend broke the protocol before answering: `status`
    cut()                  the response broke off after it started: close the client

(On 101 Switching Protocols the upstream opens a `Tunnel`, workers/tunnel.py.)

Its states, derived from what it holds (`state`):

    queued      parsed, waiting behind an earlier request of the same connection
    connecting  bound to a backend, its connection opening
    waiting     request sent (or its body still streaming), no response byte yet
    responding  response bytes are flowing to the client
    done        answered (or abandoned): no longer counted against its backend
"""

from __future__ import annotations

from workers import flow
from workers.contract import ClientConnection
from workers.http import IDEMPOTENT
from workers.timers import INF

QUEUED = "queued"
CONNECTING = "connecting"
WAITING = "waiting"
RESPONDING = "responding"
DONE = "done"


class Exchange:
    # Class-level defaults: __init__ sets only what every request has or
    # reads; the rest is assigned only when it differs (measurably cheaper per
    # request: a store is cheap, reading a default from the class is not).
    pending = None  # list of bytes waiting to go upstream (requests with a body)
    buffered = 0  # size of the body bytes in `pending`
    has_body = False
    chunked = False
    body_done = True
    body_bytes = 0
    keep_alive = True  # the client connection may carry another request
    plain = True  # keep-alive HTTP/1.1, not HEAD, no upgrade: the response fast path applies
    http10 = False
    upgrade = False
    expect_continue = False
    backend = None
    bound = False  # counted in backend.inflight
    upstream = None
    connecting = None  # the connect task while a new upstream connection opens
    tried = None  # backends already attempted (retries)
    retry_same = False  # a retry may pick a backend already tried
    response_started = False
    status = 0
    t0 = 0.0  # monotonic time of dispatch (latency, connect timeout)
    load = -1  # this worker's requests in flight to the backend when it was dispatched
    curve = None  # ml: the backend's load curve, and the expected service this request added to it
    work = 0.0
    mix = 1.0  # ... and how heavy the requests it found in flight there were, against it
    last_io = 0.0  # request fully sent / last response bytes (response timeout); 0: use t0
    error = 0  # a queued lb-generated error (status) instead of a forwarded request
    cls = 0  # request class (workers/classes.py); 0 = "default"
    rid = b""  # X-Request-Id as forwarded
    held = None  # bytes read after an upgrade request, kept until the backend answers 101
    plain_after_body = False  # `plain` once the request body has ended (False until then)
    discard = False  # answered before its body ended: the rest of the body is dropped
    discard_until = 0.0  # ... until this time at the latest (monotonic)
    content_length = 0  # declared body length (Content-Length bodies)
    chunk = None  # body pieces of a chunked request read in this read, not yet re-chunked
    guard = None  # ml: the guard to credit this request's outcome to (workers/guard.py) ...
    arm = -1  # ... under this arm (the one that picked its first backend)
    guard_t0 = 0.0  # ... and since the first dispatch (monotonic), retries included

    def __init__(self, conn: ClientConnection, method: bytes, head: bytes) -> None:
        self.conn = conn  # the Downstream that owns it
        self.client = conn.transport  # where the response goes (the upstream side writes only)
        self.method = method
        self.head = head  # the request head as forwarded (kept for retries)
        # Defaults that every request reads are stored anyway: reading an
        # attribute the instance does not have misses CPython's specialised
        # instance lookup and falls back to the generic one (via the class),
        # dearer than this store.  (Same values as the class-level ones.)
        self.pending = None
        self.cls = 0
        self.plain = True
        self.keep_alive = True
        self.body_done = True
        self.upgrade = False

    @property
    def head_request(self) -> bool:
        return self.method == b"HEAD"

    @classmethod
    def rejection(cls, conn, status: int, method: bytes = b"") -> "Exchange":
        ex = cls(conn, method, b"")
        ex.error = status
        ex.keep_alive = False
        return ex

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT

    @property
    def state(self) -> str:
        if not self.bound:
            return DONE if self.t0 else QUEUED
        if self.connecting is not None:
            return CONNECTING
        return RESPONDING if self.response_started else WAITING

    def upstream_deadline(self, t_connect: float, t_response: float) -> float:
        """When the upstream side has waited too long (the worker's sweep asks):
        to connect, or, once the request is sent, for the next response bytes."""
        if not self.bound:
            return INF
        if self.connecting is not None:
            return self.t0 + t_connect
        if self.body_done:
            return (self.last_io or self.t0) + t_response
        return INF  # the client is still sending the body: the client body timer runs

    def unbind(self) -> None:
        """Stop counting this exchange against its backend's in-flight requests."""
        if self.bound:
            self.bound = False
            self.backend.inflight -= 1
            self.conn.worker.active -= 1
            if self.curve is not None:
                self.curve.done(self.cls, self.work, self.backend.inflight)
                self.curve = None

    def flush(self) -> None:
        """Send the request bytes collected so far (head, body) upstream."""
        pending = self.pending
        if pending:
            if len(pending) == 1:
                self.upstream.transport.write(pending[0])
            else:
                self.upstream.transport.writelines(pending)
            pending.clear()
            self.buffered = 0
            gate = self.conn.gate
            if gate.reasons & flow.BODY_BUFFER:
                gate.resume(flow.BODY_BUFFER)

    def on_connected(self, task) -> None:
        self.conn.worker.dispatcher.connected(self, task)

    # -- the upstream side's interface --------------------------------------

    def pause_client(self) -> None:
        self.conn.gate.pause(flow.PEER_FULL)

    def resume_client(self) -> None:
        self.conn.gate.resume(flow.PEER_FULL)

    def complete(self) -> None:
        self.conn.response_done(self)

    def failed(self, *, sent_nothing: bool, status: int, reused: bool = False) -> None:
        self.conn.worker.dispatcher.failed(self, sent_nothing=sent_nothing, status=status, reused=reused)

    def answer_error(self, status: int) -> None:
        self.conn.worker.dispatcher.error(self, status)

    def cut(self) -> None:
        self.conn.abort_after_upstream(self)
