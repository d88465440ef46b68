"""The client side: one protocol per accepted connection, parsing requests.

Two parse paths: the C scanner (workers/_fastpath.c) takes the common
requests whole, head and Content-Length body; everything else goes to
httptools, whose callbacks store slices and nothing more, and the forwarded
head is built once in `on_headers_complete` by the rules of
`workers/request_head.py`.  A request that breaks a rule raises
`Reject(status)` from inside the parser, which stops llhttp at once: nothing
of it reaches a backend.

Pipelined requests are answered in order: only the exchange at the head of the
pipeline is dispatched; the ones behind it wait in `queue` with reading paused,
so at most one read buffer of them is held in memory.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque

from httptools import HttpParserError, HttpParserInvalidMethodError, HttpParserUpgrade, HttpRequestParser

from workers import flow
from workers.exchange import Exchange
from workers.http import (
    CONTINUE_100,
    CRLF,
    DATE,
    LAST_CHUNK,
    SEP,
    XFP_HTTP,
)
from workers.linger import LINGER_BYTES, linger
from workers.released import CLOSED
from workers.request_head import NAME_TAGS, Reject, build_exchange, name_tag
from workers.timers import CLOCK, INF

monotonic = time.monotonic
DRAIN_IDLE_GRACE = 1.0  # seconds an idle connection stays open once the worker drains
# A request answered before its body ended: the rest of the body is read and
# dropped (so the answer is not lost to a reset), at most this long in all and
# with at most DISCARD_IDLE between two reads (nginx's lingering_time/_timeout).
DISCARD_TIME = 30.0
DISCARD_IDLE = 5.0
# Parse-ahead of pipelined requests: at this many queued behind the one in
# flight, the rest of a read is kept unparsed (reading is paused) until the
# pipeline has room.  httptools is fed at most PARSE_SLICE bytes at a time
# (plus what is left of a Content-Length body) so it can stop there too.
PIPELINE_DEPTH = 16
PARSE_SLICE = 8192


# TCP states (Linux tcp_states.h) in which the client has closed its side or
# reset the connection: TCP_CLOSE_WAIT, TCP_CLOSE.
PEER_CLOSED_STATES = (8, 7)
TCP_INFO = getattr(socket, "TCP_INFO", None)


class _StopReading(Exception):
    """Raised from a parser callback once the connection is closed: nothing
    after that point is parsed (and nothing answered)."""


class Downstream(asyncio.Protocol):
    XFP = XFP_HTTP  # the X-Forwarded-Proto line this listener adds

    __slots__ = (
        "worker",
        "parser",
        "transport",
        "gate",
        "ex",
        "reading",
        "queue",
        "headers",
        "specials",
        "url",
        "head_bytes",
        "deadline",
        "send_deadline",
        "client_ip",
        "xff_line",
        "xff_tail",
        "upgrading",
        "tunnel",
        "broken",
        "linger_left",
        "closed",
        "fast",
        "scanner",
        "in_message",
        "discard_idle",
        "unparsed",
        "parse_scheduled",
        "body_left",
        "dispatch",
    )

    def __init__(self, worker) -> None:
        self.worker = worker
        p = self.parser = HttpRequestParser(self)
        p.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport = None
        self.gate = None
        self.ex = None  # the exchange at the head of the pipeline
        self.reading = None  # the exchange whose request is being read
        self.queue = None  # exchanges waiting behind `ex`
        self.headers: list = []
        self.specials: list = []  # (tag, value) of the fields with a rule
        self.url = b""
        self.head_bytes = 0
        self.deadline = INF
        self.send_deadline = INF
        self.client_ip = b""
        self.xff_line = b""
        self.xff_tail = b""
        self.upgrading = None  # the exchange that asked for an upgrade
        self.tunnel = None  # the UpstreamConnection once switched to a tunnel
        self.broken = False
        self.linger_left = LINGER_BYTES  # bytes still read and dropped once broken (workers/linger.py)
        self.closed = False
        # The C scanner (workers/_fastpath.c), None once a request said it is
        # the last (Connection: close, HTTP/1.0): what follows it is not read.
        self.scanner = worker.scan_request
        # The next read may go to the scanner: the httptools parser holds no
        # partial message (it never held one, or its last one completed).
        self.fast = self.scanner is not None
        self.in_message = False  # httptools is inside a message (slow path only)
        self.discard_idle = min(DISCARD_IDLE, worker.t_client_body)
        self.unparsed = b""  # read, not parsed yet: the pipeline is full
        self.parse_scheduled = False
        # Bytes of a Content-Length body the C scanner began (`reading`) still
        # to come: relayed by counting, never parsed.
        self.body_left = 0
        self.dispatch = worker.dispatcher.dispatch  # sends an exchange upstream (workers/dispatch.py)

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
            self.tunnel.transport.close()
            self.tunnel = None
        ex = self.ex
        if ex is not None:
            self.ex = None
            self.worker.dispatcher.abandon(ex)
        if self.queue:
            self.queue.clear()
        # The protocol and its parser refer to each other: this object waits for
        # the cycle collector, which may not run for a long time.  What it holds
        # that can be large goes now.
        self.unparsed = b""
        self.reading = self.upgrading = None
        self.headers = []
        self.specials = []
        self.transport = self.gate.transport = CLOSED  # (workers/released.py)

    def peer_gone(self) -> bool:
        """Reading is paused, so an end of file or a reset from the client goes
        unseen (and what this connection holds stays held): ask the kernel."""
        if TCP_INFO is None:
            return False
        sock = self.transport.get_extra_info("socket")
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)
        except (OSError, AttributeError):
            return False
        return bool(state) and state[0] in PEER_CLOSED_STATES

    def pause_writing(self) -> None:
        self.send_deadline = CLOCK.tick() + self.worker.t_send
        up = self._upstream()
        if up is not None:
            up.gate.pause(flow.PEER_FULL)

    def resume_writing(self) -> None:
        self.send_deadline = INF
        up = self._upstream()
        if up is not None:
            up.gate.resume(flow.PEER_FULL)

    def _upstream(self):
        if self.tunnel is not None:
            return self.tunnel
        ex = self.ex
        return ex.upstream if ex is not None else None

    def data_received(self, data: bytes) -> None:
        if self.body_left:
            data = self._count_body(data)
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
                        self._flush_body()
                    return
                q = self.queue
                if q is not None and len(q) >= PIPELINE_DEPTH:
                    self.unparsed = data[pos:]  # parsed once the pipeline has room
                    return
            self.fast = False
            if pos:
                data = data[pos:]
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            self.deadline = CLOCK.now + self.worker.t_tunnel_idle
            return
        if self.upgrading is not None:
            self._hold_upgrade(self.upgrading, data)
            return
        if self.broken:
            self.linger_left -= len(data)  # dropped: after an error nothing more is parsed
            if self.linger_left < 0:
                self.transport.close()
            return
        if self.url:  # a request head is in progress since an earlier read
            self.head_bytes += len(data)
        try:
            if len(data) <= PARSE_SLICE:
                self.parser.feed_data(data)
            else:
                self._feed_sliced(data)
        except HttpParserUpgrade as exc:
            ex = self.upgrading = self.reading
            self.reading = None
            # Nothing after the upgrade request is read or forwarded until the
            # backend agrees to switch (101): to a backend that answers anything
            # else, those bytes would be a request that skipped every rule here.
            self.gate.pause(flow.UPGRADE)
            rest = data[getattr(exc, "start", 0) + exc.args[0]:]  # (offset in the slice fed)
            if rest:
                self._hold_upgrade(ex, rest)
            first = self.ex  # the upgrade request itself, or a request before it whose
            if first is not None and first.pending and first.upstream is not None:
                first.flush()  # body (or head) this read brought
            return
        except HttpParserError as exc:
            ctx = exc.__context__
            if isinstance(ctx, _StopReading):
                return
            if isinstance(ctx, Reject):
                self._reject(ctx.status)
            else:
                # llhttp refused the bytes; past the method token (an error in it
                # is an invalid method), the parser holds this request's method.
                past_method = self.in_message and not isinstance(exc, HttpParserInvalidMethodError)
                self._reject(400, self.parser.get_method() if past_method else None)
            ex = self.ex
            if ex is not None and ex.pending and ex.upstream is not None:
                ex.flush()  # what earlier, valid requests read along with it
            return
        if self.url:
            version = self.parser.get_http_version()
            if version == "0.9" or (version == "0.0" and data[-1:] == b"\n"):
                # The request line ended without a version (HTTP/0.9; llhttp says
                # 0.9 once anything follows that line): llhttp waits for header
                # fields such a client never sends.
                self._reject(400)
            else:
                self._partial_head()
            if self.broken:
                ex = self.ex
                if ex is not None and ex.pending and ex.upstream is not None:
                    ex.flush()  # what earlier, valid requests read along with it
                return
        elif (not self.in_message and self.reading is None and self.upgrading is None
              and self.scanner is not None):
            self.fast = True  # httptools ended on a message boundary
        r = self.reading
        if r is not None and r.chunk:
            self._seal_chunk(r)  # this read's pieces of a chunked body: one chunk
        self._flush_body()  # body bytes collected during this read

    def _count_body(self, data: bytes) -> bytes:
        """The next bytes of a body the C scanner began: relayed up to its end
        (as httptools' on_body / on_message_complete would), the rest returned."""
        left = self.body_left
        if len(data) <= left:
            piece = data
            data = b""
        else:
            piece = data[:left]
            data = data[left:]
        left = self.body_left = left - len(piece)
        try:
            self.on_body(piece)
            if not left:
                self.on_message_complete()
        except _StopReading:
            return b""
        self._flush_body()
        return data

    def _flush_body(self) -> None:
        """Body bytes collected for the exchange in flight: send them, or pause
        reading once too many wait for its upstream connection."""
        ex = self.ex
        if ex is not None and ex.pending:
            if ex.upstream is not None:
                ex.flush()
            elif ex.buffered > flow.WRITE_LIMIT:
                self.gate.pause(flow.BODY_BUFFER)

    def _feed_sliced(self, data: bytes) -> None:
        """Feed a long read to httptools a slice at a time, stopping once the
        pipeline is full (the rest is kept in `unparsed`).  A Content-Length
        body goes in whole: the slices only bound how many requests one
        feed_data call can queue."""
        feed = self.parser.feed_data
        n = len(data)
        start = 0
        while True:
            step = PARSE_SLICE
            r = self.reading
            if r is not None and r.content_length:
                step += r.content_length - r.body_bytes
            end = start + step
            try:
                feed(data[start:end] if start or end < n else data)
            except HttpParserUpgrade as exc:
                exc.start = start  # its offset is within the slice
                raise
            if end >= n:
                return
            start = end
            q = self.queue
            if q is not None and len(q) >= PIPELINE_DEPTH:
                self.unparsed = data[start:]
                if self.url:
                    self.head_bytes -= n - start  # counted again when parsed
                return

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

    @staticmethod
    def _seal_chunk(ex: Exchange) -> None:
        pieces = ex.chunk
        ex.chunk = None
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        ex.pending += (b"%x\r\n" % len(data), data, CRLF)

    def _partial_head(self) -> None:
        """This read ended inside a request head: start its timer, bound its size."""
        w = self.worker
        if not self.head_bytes:
            # First sight of this head: `head_bytes` > 0 from now on marks it started.
            self.head_bytes = 1
            self.deadline = CLOCK.tick() + w.t_client_header
        if self.head_bytes > w.max_head_bytes or len(self.url) > w.max_request_line:
            self._reject(414 if len(self.url) > w.max_request_line else 431)

    def _hold_upgrade(self, ex, data: bytes) -> None:
        """Bytes after an upgrade request: kept (reading is paused, so at most a
        read or two) until a 101 starts the tunnel, dropped on any other answer."""
        if ex.held is None:
            ex.held = []
        ex.held.append(data)
        self.gate.pause(flow.UPGRADE)

    # -- parser callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = True

    def on_url(self, url: bytes) -> None:
        # Also the mark of a head in progress: `url` is emptied once the head is complete.
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.reading is not None:
            return  # a trailer field of a chunked body: not forwarded, no part of the next head
        tag = NAME_TAGS.get(name)
        if tag is None:
            tag = name_tag(name)
        if not tag:
            self.headers += (name, SEP, value, CRLF)
        else:
            self.specials.append((tag, value))

    def on_headers_complete(self) -> None:
        # The C scanner takes the common requests whole; what reaches httptools
        # gets every rule here (workers/request_head.py): one assembly and one
        # limits check per path.
        w = self.worker
        ex = build_exchange(self, self.parser, self.url, self.headers, self.specials, w)
        if ex.upgrade and ex.has_body:
            # httptools skips the body of an upgrade request (it hands over at the
            # end of the head): forwarded, its framing would promise the backend a
            # body that then arrives, if ever, as tunnel bytes.
            raise Reject(400)
        if not ex.keep_alive:
            self.scanner = None  # the last request on this connection
        if w.limiter is not None and not w.limiter.allow(self.client_ip):
            w.limited += 1
            ex.error = 429
        self.headers = []
        self.specials = []
        self.url = b""
        self.head_bytes = 0
        w.requests += 1
        if ex.pending is not None:  # a body (or upgrade) follows
            self.reading = ex
            if ex.has_body:
                self.deadline = CLOCK.tick() + w.t_client_body
                if ex.plain:
                    # Until the body ends, a response is early: the upstream takes
                    # its slow path, which closes the connection after it.
                    ex.plain = False
                    ex.plain_after_body = True
        if self.ex is None:
            self._start(ex)
        else:
            self._enqueue(ex)

    def _simple(self, method: bytes, url: bytes, head: bytes, rid: bytes,
                length: int = 0, left: int = 0) -> None:
        """A common request (nothing with a rule), its forwarded head built.
        With a Content-Length body (`length`), `head` holds the body bytes read
        so far; `left` more are still to come (relayed by `_count_body`)."""
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
                self._read_body(ex, length, left)
        if w.request_checks:  # request classes or a rate limit are configured
            if w.classify is not None:
                ex.cls = w.classify(method, url, length)
            if w.limiter is not None and not w.limiter.allow(self.client_ip):
                w.limited += 1
                ex.error = 429
                if self.ex is None:
                    self._start(ex)
                else:
                    self._enqueue(ex)
                return
        if self.ex is None:
            self.ex = ex
            self.dispatch(ex)
        else:
            self._enqueue(ex)

    def _read_body(self, ex: Exchange, length: int, left: int) -> None:
        """`ex`'s body is still arriving: it is the request being read, as
        `on_headers_complete` makes one (the head and the body read so far wait in `pending`)."""
        ex.pending = [ex.head]
        ex.body_done = False
        ex.content_length = length
        ex.body_bytes = ex.buffered = length - left
        if ex.plain:
            ex.plain = False  # until the body ends (see on_headers_complete)
            ex.plain_after_body = True
        self.reading = ex
        self.body_left = left
        self.deadline = CLOCK.tick() + self.worker.t_client_body

    def _enqueue(self, ex: Exchange) -> None:
        if self.queue is None:
            self.queue = deque()
        self.queue.append(ex)
        self.gate.pause(flow.PIPELINE)

    def on_body(self, data: bytes) -> None:
        ex = self.reading
        if ex.discard:  # answered already: dropped, never buffered
            ex.body_bytes += len(data)  # (where the body ends: _feed_sliced)
            now = CLOCK.tick()
            self.deadline = min(now + self.discard_idle, ex.discard_until)
            return
        n = ex.body_bytes = ex.body_bytes + len(data)
        w = self.worker
        if w.max_body_size and n > w.max_body_size:
            raise Reject(413)
        if ex.chunked:
            # Re-chunked once per read (_seal_chunk), not once per chunk received:
            # a body of 1-byte chunks would otherwise become three objects a byte.
            c = ex.chunk
            if c is None:
                ex.chunk = [data]
            else:
                c.append(data)
        else:
            ex.pending.append(data)
        ex.buffered += len(data)
        self.deadline = CLOCK.tick() + w.t_client_body

    def on_message_complete(self) -> None:
        self.in_message = False
        ex = self.reading
        if ex is None:
            return  # a request without a body: complete since its head
        if ex.discard:
            self._discarded(ex)
            return
        if ex.chunked:
            if ex.chunk:
                self._seal_chunk(ex)
            ex.pending.append(LAST_CHUNK)
        ex.body_done = True
        ex.last_io = CLOCK.now  # the upstream response timer starts with the request sent
        if ex.upgrade:
            return  # `reading` stays set: data_received takes it as the upgrading exchange
        if ex.plain_after_body:
            ex.plain = True
        self.reading = None
        self.deadline = INF

    def _discard_body(self, ex: Exchange) -> None:
        """`ex` is answered, its body still arriving: read the rest and drop it,
        bounded in time; then keep the connection (if the answer allows) or close."""
        ex.discard = True
        ex.pending = None
        ex.buffered = 0
        # Nothing goes upstream any more: reasons tied to the upstream are gone.
        self.gate.resume(flow.BODY_BUFFER | flow.PEER_FULL)
        now = CLOCK.tick()
        ex.discard_until = now + DISCARD_TIME
        self.deadline = min(now + self.discard_idle, ex.discard_until)

    def _discarded(self, ex: Exchange) -> None:
        """The body of an answered request has ended (on_message_complete)."""
        self.reading = None
        if ex.keep_alive and not self.worker.draining:
            self.deadline = CLOCK.now + self.worker.t_keepalive
            return
        self.transport.close()
        raise _StopReading  # what follows the body is not read

    # -- the pipeline ----------------------------------------------------------

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
            self._discard_body(ex)  # an early answer: its request body is still coming
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
        elif self.reading is None and not self.url:
            if w.draining:
                # This response's head went out before the drain began, without
                # Connection: close, so the client may be sending its next request
                # right now: answer it (with close) if it comes within the grace,
                # rather than closing under it.
                self.deadline = CLOCK.now + DRAIN_IDLE_GRACE
            else:
                self.deadline = CLOCK.now + w.t_keepalive

    def start_tunnel(self, up, ex: Exchange) -> None:
        self.tunnel = up
        self.ex = None
        self.upgrading = None
        self.deadline = CLOCK.tick() + self.worker.t_tunnel_idle  # renewed by bytes either way
        held = ex.held
        if held:  # what the client sent after its upgrade request, now tunnel bytes
            ex.held = None
            up.transport.writelines(held)
        self.gate.resume(flow.BODY_BUFFER | flow.PIPELINE | flow.UPGRADE)

    # -- failure paths --------------------------------------------------------

    def _reject(self, status: int, method: bytes | None = None) -> None:
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
        # The rejected request's method, once its request line is read (`url`
        # set; before that the parser still holds the previous request's): an
        # answer to HEAD ends with its head (RFC 9112 6.3), even lb's own.
        if method is None:
            method = reading.method if reading is not None else self.parser.get_method() if self.url else b""
        self.url = b""
        self.worker.rejected += 1
        self.gate.pause(flow.PIPELINE)
        reading = self.reading
        self.reading = None
        ex = self.ex
        if ex is not None and reading is ex:
            # The bad bytes belong to the exchange in flight (its body).
            if ex.response_started:
                self.worker.dispatcher.abandon(ex)
                self.transport.close()
                return
            self.worker.dispatcher.abandon(ex)
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
            elif self.url or reading is not None:
                self.worker.timeouts += 1
                self._reject(408)  # slow client: head or body did not arrive in time
            elif self.ex is None and self.tunnel is None:
                self.transport.close()  # idle keep-alive connection
        if self.send_deadline < now:
            self.worker.timeouts += 1
            self.transport.abort()  # the client stopped reading

    def drain(self) -> None:
        """The worker drains: an idle keep-alive connection is closed after a short
        grace, so a request already on its way is still answered (with Connection:
        close) instead of meeting a reset."""
        if self.ex is None and self.reading is None and not self.url and self.tunnel is None:
            self.deadline = min(self.deadline, CLOCK.now + DRAIN_IDLE_GRACE)


