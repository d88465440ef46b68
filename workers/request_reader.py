"""The reading side of a client connection, for what the C scanner does not take.

A `RequestReader` belongs to one `Downstream` (workers/downstream.py).  It
owns the httptools parser, whose callbacks store slices and nothing more;
the forwarded head is built once, in `on_headers_complete`, by the rules of
`workers/request_head.py`.  It also collects request bodies: httptools'
(Content-Length and chunked), and the rest of a Content-Length body whose
head the C scanner took (`count`, the body relayed by counting, never
parsed).  Every exchange it makes goes to the connection (`conn.accept`),
which answers requests in order.

A request that breaks a rule raises `Reject(status)` from inside the parser,
which stops llhttp at once: nothing of it reaches a backend.

Its state, as named by the connection: `in_head` (a request head in
progress since an earlier read; its target so far in `url`), `in_message`
(httptools is inside a message: the next read cannot go to the scanner),
and the connection's `reading` exchange (a body in progress).
"""

from __future__ import annotations

from httptools import HttpParserError, HttpParserInvalidMethodError, HttpParserUpgrade, HttpRequestParser

from workers import flow, tunnel
from workers.exchange import Exchange
from workers.http import CRLF, LAST_CHUNK, SEP
from workers.request_head import NAME_TAGS, Reject, build_exchange, name_tag
from workers.timers import CLOCK, INF

# A request answered before its body ended: the rest of the body is read and
# dropped (so the answer is not lost to a reset), at most this long in all and
# with at most DISCARD_IDLE between two reads (nginx's lingering_time/_timeout).
DISCARD_TIME = 30.0
DISCARD_IDLE = 5.0
# httptools is fed at most PARSE_SLICE bytes at a time (plus what is left of a
# Content-Length body) so it can stop once the pipeline is full.
PARSE_SLICE = 8192


class StopReading(Exception):
    """Raised from a parser callback once the connection is closed: nothing
    after that point is parsed (and nothing answered)."""


class RequestReader:
    __slots__ = ("conn", "worker", "parser", "headers", "specials", "url", "in_head", "head_timed",
                 "head_bytes", "in_message", "discard_idle")

    def __init__(self, conn) -> None:
        self.conn = conn
        self.worker = w = conn.worker
        p = self.parser = HttpRequestParser(self)
        p.set_dangerous_leniencies(lenient_data_after_close=True)
        self.headers: list = []
        self.specials: list = []  # (tag, value) of the fields with a rule
        self.url = b""
        self.in_head = False  # a request head is in progress since an earlier read
        self.head_timed = False  # ... and its timer runs (since the first read that ended inside it)
        self.head_bytes = 0  # bytes of that head read since then (its size limit)
        self.in_message = False  # httptools is inside a message
        self.discard_idle = min(DISCARD_IDLE, w.t_client_body)

    def reset(self) -> None:
        """The connection is broken or gone: nothing of a head in progress is kept."""
        self.url = b""
        self.in_head = self.head_timed = False
        self.headers = []
        self.specials = []

    def method(self) -> bytes:
        """The method of the request being parsed, once its request line is read
        (before that the parser still holds the previous request's)."""
        return self.parser.get_method() if self.in_head else b""

    # -- bytes in ------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """A read for httptools: parse it, then act on where it stopped."""
        conn = self.conn
        if self.in_head:
            self.head_bytes += len(data)
        try:
            if len(data) <= PARSE_SLICE:
                self.parser.feed_data(data)
            else:
                self._feed_sliced(data)
        except HttpParserUpgrade as exc:
            ex = conn.reading
            conn.reading = None
            tunnel.requested(conn, ex, data[getattr(exc, "start", 0) + exc.args[0]:])
            return
        except HttpParserError as exc:
            ctx = exc.__context__
            if isinstance(ctx, StopReading):
                return
            if isinstance(ctx, Reject):
                conn.reject(ctx.status)
            else:
                # llhttp refused the bytes; past the method token (an error in it
                # is an invalid method), the parser holds this request's method.
                past_method = self.in_message and not isinstance(exc, HttpParserInvalidMethodError)
                conn.reject(400, self.parser.get_method() if past_method else None)
            conn.flush_body()  # what earlier, valid requests read along with it
            return
        if self.in_head:
            version = self.parser.get_http_version()
            if version == "0.9" or (version == "0.0" and data[-1:] == b"\n"):
                # The request line ended without a version (HTTP/0.9; llhttp says
                # 0.9 once anything follows that line): llhttp waits for header
                # fields such a client never sends.
                conn.reject(400)
            else:
                self._partial_head()
            if conn.broken:
                conn.flush_body()  # what earlier, valid requests read along with it
                return
        elif (not self.in_message and conn.reading is None and conn.upgrading is None
              and conn.scanner is not None):
            conn.fast = True  # httptools ended on a message boundary
        r = conn.reading
        if r is not None and r.chunk:
            self._seal_chunk(r)  # this read's pieces of a chunked body: one chunk
        conn.flush_body()  # body bytes collected during this read

    def _feed_sliced(self, data: bytes) -> None:
        """Feed a long read to httptools a slice at a time, stopping once the
        pipeline is full (the rest is kept in `conn.unparsed`).  A
        Content-Length body goes in whole: the slices only bound how many
        requests one feed_data call can queue."""
        feed = self.parser.feed_data
        conn = self.conn
        n = len(data)
        start = 0
        while True:
            step = PARSE_SLICE
            r = conn.reading
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
            if conn.pipeline_full():
                conn.unparsed = data[start:]
                if self.in_head:
                    self.head_bytes -= n - start  # counted again when parsed
                return

    def _partial_head(self) -> None:
        """This read ended inside a request head: start its timer, bound its size."""
        w = self.worker
        if not self.head_timed:
            self.head_timed = True
            self.head_bytes = 1  # (this first read is not counted: at most one read buffer)
            self.conn.deadline = CLOCK.tick() + w.t_client_header
        if self.head_bytes > w.max_head_bytes or len(self.url) > w.max_request_line:
            self.conn.reject(414 if len(self.url) > w.max_request_line else 431)

    @staticmethod
    def _seal_chunk(ex: Exchange) -> None:
        pieces = ex.chunk
        ex.chunk = None
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        ex.pending += (b"%x\r\n" % len(data), data, CRLF)

    # -- a Content-Length body the C scanner began -------------------------------

    def begin_counted(self, ex: Exchange, length: int, left: int) -> None:
        """`ex`'s head and the first body bytes came through the scanner, `left`
        body bytes are still to come: `ex` is the request being read, as
        `on_headers_complete` makes one (head and body so far wait in `pending`)."""
        ex.pending = [ex.head]
        ex.body_done = False
        ex.content_length = length
        ex.body_bytes = ex.buffered = length - left
        if ex.plain:
            ex.plain = False  # until the body ends (see on_headers_complete)
            ex.plain_after_body = True
        conn = self.conn
        conn.reading = ex
        conn.body_left = left
        conn.deadline = CLOCK.tick() + self.worker.t_client_body

    def count(self, data: bytes) -> bytes:
        """The next bytes of that body: relayed up to its end (as httptools'
        on_body / on_message_complete would), the rest returned."""
        conn = self.conn
        left = conn.body_left
        if len(data) <= left:
            piece = data
            data = b""
        else:
            piece = data[:left]
            data = data[left:]
        left = conn.body_left = left - len(piece)
        try:
            self.on_body(piece)
            if not left:
                self.on_message_complete()
        except StopReading:
            return b""
        conn.flush_body()
        return data

    # -- parser callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.conn.reading is not None:
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
        conn = self.conn
        w = self.worker
        ex = build_exchange(conn, self.parser, self.url, self.headers, self.specials, w)
        if ex.upgrade and ex.has_body:
            # httptools skips the body of an upgrade request (it hands over at the
            # end of the head): forwarded, its framing would promise the backend a
            # body that then arrives, if ever, as tunnel bytes.
            raise Reject(400)
        if not ex.keep_alive:
            conn.scanner = None  # the last request on this connection
        if w.limiter is not None and not w.limiter.allow(conn.client_ip):
            w.limited += 1
            ex.error = 429
        self.headers = []
        self.specials = []
        self.url = b""
        self.in_head = self.head_timed = False
        self.head_bytes = 0
        w.requests += 1
        if ex.pending is not None:  # a body (or upgrade) follows
            conn.reading = ex
            if ex.has_body:
                conn.deadline = CLOCK.tick() + w.t_client_body
                if ex.plain:
                    # Until the body ends, a response is early: the upstream takes
                    # its slow path, which closes the connection after it.
                    ex.plain = False
                    ex.plain_after_body = True
        conn.accept(ex)

    def on_body(self, data: bytes) -> None:
        conn = self.conn
        ex = conn.reading
        if ex.discard:  # answered already: dropped, never buffered
            ex.body_bytes += len(data)  # (where the body ends: _feed_sliced)
            now = CLOCK.tick()
            conn.deadline = min(now + self.discard_idle, ex.discard_until)
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
        conn.deadline = CLOCK.tick() + w.t_client_body

    def on_message_complete(self) -> None:
        self.in_message = False
        conn = self.conn
        ex = conn.reading
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
            return  # `reading` stays set: feed() takes it as the upgrading exchange
        if ex.plain_after_body:
            ex.plain = True
        conn.reading = None
        conn.deadline = INF

    # -- a body nobody waits for ----------------------------------------------

    def discard(self, ex: Exchange) -> None:
        """`ex` is answered, its body still arriving: read the rest and drop it,
        bounded in time; then keep the connection (if the answer allows) or close."""
        ex.discard = True
        ex.pending = None
        ex.buffered = 0
        conn = self.conn
        # Nothing goes upstream any more: reasons tied to the upstream are gone.
        conn.gate.resume(flow.BODY_BUFFER | flow.PEER_FULL)
        now = CLOCK.tick()
        ex.discard_until = now + DISCARD_TIME
        conn.deadline = min(now + self.discard_idle, ex.discard_until)

    def _discarded(self, ex: Exchange) -> None:
        """The body of an answered request has ended (on_message_complete)."""
        conn = self.conn
        conn.reading = None
        if ex.keep_alive and not self.worker.draining:
            conn.deadline = CLOCK.now + self.worker.t_keepalive
            return
        conn.transport.close()
        raise StopReading  # what follows the body is not read
