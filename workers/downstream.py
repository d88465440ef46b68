"""The client side: one protocol per accepted connection.

Two parse paths: the C scanner (workers/_fastpath.c) takes the common
requests whole, head and Content-Length body, right here in
`data_received`; everything else goes to the connection's `RequestReader`
(workers/request_reader.py: httptools, the rules of workers/request_head.py,
request bodies).  Both hand their exchanges to `accept`.

Pipelined requests are answered in order: only the exchange at the head of the
pipeline (`ex`) is dispatched; the ones behind it wait in `queue` with reading
paused, so at most one read buffer of them is held in memory.

The connection's state, by name: `ex` (the request being answered),
`reading` (the request whose body is arriving), `reader.in_head` (a head in
progress), `upgrading` (an upgrade request waits for its 101: nothing more is
read), `tunnel` (switched protocols: a byte pipe), `broken` (a request broke
the rules: answered, then nothing more is parsed), `closed`.
"""

from __future__ import annotations

import asyncio
from collections import deque

from workers import flow, tunnel
from workers.exchange import Exchange
from workers.http import CONTINUE_100, CRLF, DATE, XFP_HTTP
from workers.linger import LINGER_BYTES, linger
from workers.released import CLOSED
from workers.request_reader import RequestReader
from workers.timers import CLOCK, INF

DRAIN_IDLE_GRACE = 1.0  # seconds an idle connection stays open once the worker drains
# Parse-ahead of pipelined requests: at this many queued behind the one in
# flight, the rest of a read is kept unparsed (reading is paused) until the
# pipeline has room.
PIPELINE_DEPTH = 16


class Downstream(asyncio.Protocol):
    XFP = XFP_HTTP  # the X-Forwarded-Proto line this listener adds

    __slots__ = (
        "worker", "reader", "transport", "gate", "ex", "reading", "queue", "deadline", "send_deadline",
        "client_ip", "xff_line", "xff_tail", "upgrading", "tunnel", "broken", "linger_left", "closed", "fast",
        "scanner", "unparsed", "parse_scheduled", "body_left", "dispatch",
    )

    def __init__(self, worker) -> None:
        self.worker = worker
        self.transport = None
        self.gate = None
        self.ex = None  # the exchange at the head of the pipeline
        self.reading = None  # the exchange whose request is being read
        self.queue = None  # exchanges waiting behind `ex`
        self.deadline = INF
        self.send_deadline = INF
        self.client_ip = b""
        self.xff_line = b""
        self.xff_tail = b""
        self.upgrading = None  # the exchange that asked for an upgrade
        self.tunnel = None  # the Tunnel once a 101 switched protocols (workers/tunnel.py)
        self.broken = False
        self.linger_left = LINGER_BYTES  # bytes still read and dropped once broken (workers/linger.py)
        self.closed = False
        # The C scanner (workers/_fastpath_request.c), None once a request said it is
        # the last (Connection: close, HTTP/1.0): what follows it is not read.
        self.scanner = worker.scan_request
        # The next read may go to the scanner: the httptools parser holds no
        # partial message (it never held one, or its last one completed).
        self.fast = self.scanner is not None
        self.unparsed = b""  # read, not parsed yet: the pipeline is full
        self.parse_scheduled = False
        # Bytes of a Content-Length body the C scanner began (`reading`) still
        # to come: relayed by counting, never parsed.
        self.body_left = 0
        self.dispatch = worker.dispatcher.dispatch  # sends an exchange upstream (workers/dispatch.py)
        self.reader = RequestReader(self)  # httptools and request bodies (workers/request_reader.py)

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport) -> None:
        w = self.worker
        self.transport = transport
        transport.set_write_buffer_limits(flow.WRITE_LIMIT)
        self.gate = flow.ReadGate(transport)
        if not self.client_ip:  # (else set from a PROXY protocol header: workers/proxyproto.py)
            peer = transport.get_extra_info("peername")
            self.client_ip = (peer[0] if peer else "unknown").encode()
        self.set_client(self.client_ip)
        # Timers that start rarely read the exact time: the coarse clock may lag
        # by a sweep interval (more on a loaded machine) and would fire them early.
        self.deadline = CLOCK.tick() + w.t_client_header
        w.conns.add(self)
        w.accepted += 1
        w.listener.accepted()  # here, so the accept loop stops right after this one at the cap
        if w.draining:
            # Accepted just before the listener closed: serve it (with Connection:
            # close), but do not let it idle.
            self.deadline = CLOCK.now + DRAIN_IDLE_GRACE

    def set_client(self, ip: bytes) -> None:
        """The client's address: the peer's, or the one a PROXY protocol header
        gave (workers/proxyproto.py); X-Forwarded-For, rate limits and logs use it."""
        self.client_ip = ip
        self.xff_line = b"X-Forwarded-For: " + ip + CRLF
        self.xff_tail = CRLF + self.xff_line + self.XFP + CRLF

    def connection_lost(self, exc) -> None:
        self.closed = True
        w = self.worker
        w.conns.discard(self)
        if w.listener.paused:
            w.listener.maybe_resume()
        if self.tunnel is not None:
            self.tunnel.client_closed()
            self.tunnel = None
        ex = self.ex
        if ex is not None:
            self.ex = None
            self.worker.dispatcher.abandon(ex)
        if self.queue:
            self.queue.clear()
        # The protocol, its reader and the parser refer to each other: this object
        # waits for the cycle collector, which may not run for a long time.  What
        # it holds that can be large goes now.
        self.unparsed = b""
        self.reading = self.upgrading = None
        self.reader.reset()
        self.transport = self.gate.transport = CLOSED  # (workers/released.py)

    def pause_writing(self) -> None:
        self.send_deadline = CLOCK.tick() + self.worker.t_send
        self._client_full(True)

    def resume_writing(self) -> None:
        self.send_deadline = INF
        self._client_full(False)

    def _client_full(self, full: bool) -> None:
        """Back-pressure from the client: stop (or resume) reading the backend."""
        if self.tunnel is not None:
            self.tunnel.client_full(full)
            return
        ex = self.ex
        up = ex.upstream if ex is not None else None
        if up is not None:
            up.gate.pause(flow.PEER_FULL) if full else up.gate.resume(flow.PEER_FULL)

    def data_received(self, data: bytes) -> None:
        if self.body_left:
            data = self.reader.count(data)
            if not data:
                return
        if self.fast:
            # The common requests, recognised whole by the C scanner; it declines
            # the first one it does not fully recognise (or a head cut by the end
            # of this read), which then goes to httptools with the rest.  A
            # Content-Length body comes with its head, as far as this read holds it.
            scan = self.scanner
            tail = self.xff_tail
            pos = 0
            while True:
                r = scan(data, pos, tail)
                if r is None:
                    break
                pos = r[4]
                self._simple(r[0], r[1], r[2], r[3], r[5], r[6])
                if pos == len(data):
                    if self.body_left:
                        self.flush_body()
                    return
                q = self.queue
                if q is not None and len(q) >= PIPELINE_DEPTH:
                    self.unparsed = data[pos:]  # parsed once the pipeline has room
                    return
            self.fast = False
            if pos:
                data = data[pos:]
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.upgrading is not None:
            tunnel.hold(self, self.upgrading, data)
            return
        if self.broken:
            self.linger_left -= len(data)  # dropped: after an error nothing more is parsed
            if self.linger_left < 0:
                self.transport.close()
            return
        self.reader.feed(data)

    def flush_body(self) -> None:
        """Body bytes collected for the exchange in flight: send them, or pause
        reading once too many wait for its upstream connection."""
        ex = self.ex
        if ex is not None and ex.pending:
            if ex.upstream is not None:
                ex.flush()
            elif ex.buffered > flow.WRITE_LIMIT:
                self.gate.pause(flow.BODY_BUFFER)

    def _parse_unparsed(self) -> None:
        """The pipeline has room again: parse what was read before it filled up."""
        self.parse_scheduled = False
        data = self.unparsed
        if not data or self.closed or self.broken:
            return
        self.unparsed = b""
        self.data_received(data)
        if not self.unparsed and not self.queue:
            self.gate.resume(flow.PIPELINE)

    def _simple(self, method: bytes, url: bytes, head: bytes, rid: bytes,
                length: int = 0, left: int = 0) -> None:
        """A common request (nothing with a rule), its forwarded head built.
        With a Content-Length body (`length`), `head` holds the body bytes read
        so far; `left` more are still to come (relayed by `reader.count`)."""
        w = self.worker
        w.requests += 1
        ex = Exchange(self, method, head)
        if rid:
            ex.rid = rid
        if method == b"HEAD":
            ex.plain = False
        if length:
            ex.has_body = True  # never resent once sent
            if left:
                self.reader.begin_counted(ex, length, left)
        if w.request_checks:  # request classes or a rate limit are configured
            if w.classify is not None:
                ex.cls = w.classify(method, url, length)
            if w.limiter is not None and not w.limiter.allow(self.client_ip):
                w.limited += 1
                ex.error = 429
                self.accept(ex)
                return
        if self.ex is None:
            self.ex = ex
            self.dispatch(ex)
        else:
            self._enqueue(ex)

    def _enqueue(self, ex: Exchange) -> None:
        if self.queue is None:
            self.queue = deque()
        self.queue.append(ex)
        self.gate.pause(flow.PIPELINE)

    # -- the pipeline ----------------------------------------------------------

    def accept(self, ex: Exchange) -> None:
        """A parsed request (workers/request_reader.py): answer it now, or after
        the ones before it."""
        if self.ex is None:
            self._start(ex)
        else:
            self._enqueue(ex)

    def pipeline_full(self) -> bool:
        q = self.queue
        return q is not None and len(q) >= PIPELINE_DEPTH

    def _start(self, ex: Exchange) -> None:
        """`ex` becomes the head of the pipeline: answer it or send it upstream."""
        self.ex = ex
        if ex.error:
            self.write_error(ex, ex.error)
            return
        if ex.expect_continue:
            self.transport.write(CONTINUE_100)
        self.dispatch(ex)

    def write_error(self, ex: Exchange, status: int) -> None:
        ex.status = status
        # An upgrade request answered by lb: what the client sent after it is
        # not HTTP lb has read (held, then dropped), so the connection ends here.
        close = not (ex.keep_alive and ex.body_done) or ex.upgrade or self.worker.draining
        ex.keep_alive = not close
        self.transport.write(DATE.error(status, close=close, head_only=ex.head_request))
        self.response_done(ex)

    def abort_after_upstream(self, ex: Exchange) -> None:
        """The upstream failed mid-response: the client can only see a truncated reply."""
        self.ex = None
        self.transport.close()

    def response_done(self, ex: Exchange) -> None:
        if self.ex is not ex:
            return
        self.ex = None
        w = self.worker
        al = w.access_log
        if al is not None:
            al.countdown -= 1
            if al.countdown <= 0:
                al.record(self, ex)
        if self.reading is ex:
            self.reader.discard(ex)  # an early answer: its request body is still coming
            return
        if not ex.keep_alive:
            if self.broken:
                linger(self)  # an error answer: do not let a reset destroy it
            else:
                self.transport.close()
            return
        q = self.queue
        if q:
            nxt = q.popleft()
            if self.unparsed:
                if len(q) <= PIPELINE_DEPTH // 2 and not self.parse_scheduled:
                    # Room again: parse on, but not from inside this call chain.
                    self.parse_scheduled = True
                    w.loop.call_soon(self._parse_unparsed)
            elif not q:
                self.gate.resume(flow.PIPELINE)
            self._start(nxt)
            if nxt.pending and nxt.upstream is not None:
                nxt.flush()
        elif self.reading is None and not self.reader.in_head:
            if w.draining:
                # This response's head went out before the drain began, without
                # Connection: close, so the client may be sending its next request
                # right now: answer it (with close) if it comes within the grace,
                # rather than closing under it.
                self.deadline = CLOCK.now + DRAIN_IDLE_GRACE
            else:
                self.deadline = CLOCK.now + w.t_keepalive

    # -- failure paths --------------------------------------------------------

    def reject(self, status: int, method: bytes | None = None) -> None:
        """A request broke the rules: answer `status` in order, then close.
        `method`: the rejected request's, when the caller knows it."""
        reading = self.reading
        if reading is not None and reading.discard:
            # The broken bytes are the dropped body of a request already answered.
            self.broken = True
            self.reading = None
            self.transport.close()
            return
        self.broken = True
        self.fast = False
        self.body_left = 0
        # The rejected request's method, once known (reader.method()): an
        # answer to HEAD ends with its head (RFC 9112 6.3), even lb's own.
        if method is None:
            method = reading.method if reading is not None else self.reader.method()
        self.reader.reset()
        self.worker.rejected += 1
        self.gate.pause(flow.PIPELINE)
        self.reading = None
        ex = self.ex
        if ex is not None and reading is ex:
            # The bad bytes belong to the exchange in flight (its body).
            self.worker.dispatcher.abandon(ex)
            if ex.response_started:
                self.transport.close()
                return
            ex.keep_alive = False
            self.write_error(ex, status)
            return
        if ex is None:
            self.transport.write(DATE.error(status, close=True, head_only=method == b"HEAD"))
            linger(self)
            return
        q = self.queue
        if reading is not None and q and q[-1] is reading:
            q.pop()
        if q is None:
            q = self.queue = deque()
        q.append(Exchange.rejection(self, status, method))

    def on_deadline(self, now: float) -> None:
        if self.deadline < now:
            self.deadline = INF
            reading = self.reading
            if reading is not None and reading.discard:
                self.transport.close()  # its answer went out: nothing more to say
            elif self.tunnel is not None:
                self.worker.timeouts += 1
                self.transport.close()  # an idle tunnel (connection_lost closes the other side)
            elif self.reader.in_head or reading is not None:
                self.worker.timeouts += 1
                self.reject(408)  # slow client: head or body did not arrive in time
            elif self.ex is None and self.tunnel is None:
                self.transport.close()  # idle keep-alive connection
        if self.send_deadline < now:
            self.worker.timeouts += 1
            self.transport.abort()  # the client stopped reading

    def drain(self) -> None:
        """The worker drains: an idle keep-alive connection is closed after a short
        grace, so a request already on its way is still answered (with Connection:
        close) instead of meeting a reset."""
        if self.ex is None and self.reading is None and not self.reader.in_head and self.tunnel is None:
            self.deadline = min(self.deadline, CLOCK.now + DRAIN_IDLE_GRACE)


