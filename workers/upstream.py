"""The upstream side: one protocol per backend connection, parsing responses.

An `UpstreamConnection` is attached to one `Exchange` at a time.  The response
parser's callbacks only collect: the head is assembled once in
`on_headers_complete`, body pieces are appended to `out`, and everything
collected during one `data_received` is handed to the client transport in one
write (one syscall).  Completion work (returning the connection to the
pool, starting the next pipelined request) runs after the parser returns, never
inside its callbacks.
"""

from __future__ import annotations

import asyncio
import time

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from lb.core.log import log
from workers import flow
from workers.contract import ClientSide
from workers.http import CRLF, LAST_CHUNK
from workers.released import CLOSED
from workers.response_head import (CONTROL_IN_LINE, CRLF_CRLF, MODE_CHUNK, MODE_NONE, MODE_RAW, MODE_UPGRADE,
                                   NO_BODY, BadStatusLine, HeadTooLarge, framing, relayed_head, upgrade_head)
from workers.tunnel import Tunnel
from workers.timers import CLOCK, INF

monotonic = time.monotonic


class _HeadResponseDone(Exception):
    """Raised from on_headers_complete to stop the parser after a HEAD response."""


def _new_parser(proto) -> HttpResponseParser:
    p = HttpResponseParser(proto)
    p.set_dangerous_leniencies(lenient_data_after_close=True)
    return p


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "backend", "pool", "worker", "transport", "gate", "parser", "ex", "mode", "informational", "done",
        "keep_alive", "out", "idle_deadline", "tunnel", "alive", "reused", "framed", "in_head", "raw",
        "head_start", "fast", "remaining", "max_head", "chunk", "scan",
    )

    def __init__(self, backend, worker) -> None:
        self.backend = backend
        self.pool = backend.pool
        self.worker = worker
        self.transport = None
        self.gate = None
        self.parser = _new_parser(self)
        self.ex: ClientSide | None = None  # the exchange served (workers/contract.py)
        self.alive = False
        self.reused = False  # has been idle in the pool at least once
        self.in_head = True  # between exchanges, always ready for the next head
        self.raw = b""
        self.head_start = 0
        self.mode = MODE_NONE
        self.informational = False
        self.done = False
        self.keep_alive = False
        self.out: list = []
        self.idle_deadline = INF
        self.tunnel = None  # workers/tunnel.py, once a 101 has switched protocols
        self.framed = False
        # The C response scanner (workers/_fastpath.c), injected by the worker
        # (None: httptools only), and whether the next response may go to it
        # (httptools holds nothing of it).
        self.scan = worker.scan_response
        self.fast = self.scan is not None
        self.remaining = 0  # body bytes still to relay of a response the scanner took
        # Longest response head accepted, informational (1xx) heads before it
        # included: a backend cannot make the worker hold or relay more.
        self.max_head = worker.max_response_head
        self.chunk: list = []  # body pieces of this read, re-chunked as one chunk (MODE_CHUNK)

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport) -> None:
        self.alive = True
        self.transport = transport
        transport.set_write_buffer_limits(flow.WRITE_LIMIT)
        self.gate = flow.ReadGate(transport)

    def pause_writing(self) -> None:
        self._backend_full(True)

    def resume_writing(self) -> None:
        self._backend_full(False)

    def _backend_full(self, full: bool) -> None:
        """Back-pressure from the backend: stop (or resume) reading the client."""
        ex = self.ex
        if ex is not None:
            ex.pause_client() if full else ex.resume_client()
        elif self.tunnel is not None:
            self.tunnel.backend_full(full)

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:
            if self.tunnel is not None:
                self.tunnel.from_backend(data)
                return
            # Bytes on an idle connection: the backend is out of sync with us.
            self.transport.abort()
            return
        if self.remaining:
            self._relay_rest(ex, data)
            return
        if self.fast:
            if ex.plain and not self.worker.draining:
                r = self.scan(data)
                # (a head the scanner took whole, but longer than the limit, goes
                # to httptools, which refuses it: only a long read is searched)
                if r is not None and (len(data) <= self.max_head
                                      or data.find(CRLF_CRLF, 0, self.max_head) >= 0):
                    # The common response: HTTP/1.1, Content-Length, to a keep-alive
                    # HTTP/1.1 client; `out` is the head minus its Connection and
                    # Keep-Alive lines, with the body bytes read so far.
                    status, out, remaining, self.keep_alive = r
                    self._began(ex, status)
                    ex.client.write(out)
                    if remaining:
                        self.remaining = remaining
                        self.framed = True
                        ex.last_io = CLOCK.now
                    else:
                        self._finish()
                    return
            self.fast = False  # this one goes to httptools (back after it completes)
        if self.in_head:
            self.raw += data
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._flush()
            if self.ex is not None and self.mode == MODE_UPGRADE:
                self._switch_to_tunnel(data[exc.args[0]:])
            else:
                self._protocol_error()
            return
        except HttpParserError as exc:
            if not isinstance(exc.__context__, _HeadResponseDone):
                if isinstance(exc.__context__, HeadTooLarge):
                    self._head_too_large()
                    return
                self._flush()
                self._protocol_error()
                return
            # A HEAD response has no body, but the parser would wait for one.
            self.parser = _new_parser(self)
            if not data.endswith(b"\r\n\r\n"):
                self.keep_alive = False
        if self.in_head and len(self.raw) > self.max_head:
            self._head_too_large()  # no end of the head within the limit (or 1xx after 1xx)
            return
        self._flush()
        if self.done:
            self._finish()
        else:
            ex.last_io = CLOCK.now

    def _began(self, ex, status: int) -> None:
        """A final response head from the backend: the exchange is responding,
        and the backend's outcome and peak EWMA of the time to first byte are
        recorded in one call (the guard's arm gets the outcome too)."""
        ex.response_started = True
        ex.status = status
        now = monotonic()
        self.backend.record(ex.cls, now - ex.t0, status >= 500, now, ex.load, ex.mix)
        if ex.guard is not None:
            ex.guard.outcome(ex.arm, now - ex.guard_t0, status >= 500)

    def _relay_rest(self, ex, data: bytes) -> None:
        """More body of a response the C scanner took: relay up to Content-Length."""
        rest = self.remaining
        n = len(data)
        if n < rest:
            self.remaining = rest - n
            ex.client.write(data)
            ex.last_io = CLOCK.now
            return
        self.remaining = 0
        if n > rest:
            # Bytes past the body: the backend broke its framing.  As on the
            # httptools path: the body goes out, then both connections close.
            ex.client.write(data[:rest])
            self._protocol_error()
            return
        ex.client.write(data)
        self._finish()

    def connection_lost(self, exc) -> None:
        self.alive = False
        self.pool.discard(self)
        if self.pool.tls is not None:  # what a TLS transport holds goes now (workers/released.py)
            self.transport = self.gate.transport = CLOSED
        if self.tunnel is not None:
            self.tunnel.backend_closed()
            self.tunnel = None
            return
        ex = self.ex
        if ex is None:
            return
        if not ex.response_started:
            self.ex = None
            ex.unbind()
            self.backend.resets += 1
            ex.failed(sent_nothing=False, status=502, reused=self.reused)
        elif not self.framed and not self.done:
            # Close-delimited response: the end of the connection ends the body.
            if self.mode == MODE_CHUNK:
                if self.chunk:
                    self._seal_chunk()
                self.out.append(LAST_CHUNK)
            self._flush()
            self.done = True
            self.keep_alive = False
            self._finish()
        else:
            self.ex = None
            ex.unbind()
            self.backend.resets += 1
            ex.cut()

    # -- parser callbacks ---------------------------------------------------
    # No on_header: the head is taken whole from the bytes llhttp validated and
    # filtered with one regex, far cheaper than a Python callback per field.

    def on_headers_complete(self) -> None:
        p = self.parser
        status = p.get_status_code()
        raw = self.raw
        start = self.head_start
        end = raw.find(b"\r\n\r\n", start) + 4
        if end > self.max_head:
            raise HeadTooLarge
        if status < 200 and status != 101:
            self.head_start = end  # 100/102/103: not relayed; the final head follows
            self.informational = True
            return
        if CONTROL_IN_LINE.match(raw, start) is not None:
            # llhttp lets any byte but CR and LF through in a reason phrase;
            # relayed, a NUL or ESC there breaks the client's parser (RFC 9112 4).
            raise BadStatusLine
        ex = self.ex
        self.in_head = False
        self.raw = b""
        if start:
            self.head_start = 0
            head = raw[start:end]
        else:
            head = raw[:end]  # (the whole of raw, not a copy, when the read ends with the head)
        self._began(ex, status)
        out, cl, self.framed = relayed_head(head)
        if cl and ex.plain and status not in NO_BODY and not self.worker.draining:
            # The common response: Content-Length body to a keep-alive HTTP/1.1 client.
            self.mode = MODE_RAW
            self.out.append(out)
            return
        if status == 101:
            self.out.append(upgrade_head(ex, head, out))
            self.mode = MODE_UPGRADE
            return
        self.mode, out = framing(ex, status, out, cl, self.worker.draining)
        self.out.append(out)
        if ex.method == b"HEAD":
            self.done = True
            self.keep_alive = self.framed and self.parser.should_keep_alive()
            raise _HeadResponseDone

    def on_body(self, data: bytes) -> None:
        mode = self.mode
        if mode == MODE_RAW:
            self.out.append(data)
        elif mode == MODE_CHUNK:
            self.chunk.append(data)  # framed once per read: _seal_chunk

    def _seal_chunk(self) -> None:
        pieces = self.chunk
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self.out += (b"%x\r\n" % len(data), data, CRLF)

    def on_message_begin(self) -> None:
        if self.done:
            # A further response starts in the same read as the one that ended:
            # bytes nobody asked for, and a parser now inside a message.  The
            # connection must not go back to the pool.
            self.keep_alive = False

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.mode == MODE_CHUNK:
            if self.chunk:
                self._seal_chunk()
            self.out.append(LAST_CHUNK)
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()

    # -- exchange lifecycle -------------------------------------------------

    def _flush(self) -> None:
        """What this read collected, to the client: one write, the pieces joined
        (a join of one item returns it as is); never one buffer per parsed span,
        which a body of tiny chunks would turn into many small objects held."""
        if self.chunk:
            self._seal_chunk()
        out = self.out
        if out:
            ex = self.ex
            if ex is not None:
                ex.client.write(b"".join(out))  # one write per read, one buffer
            out.clear()

    def _finish(self) -> None:
        ex = self.ex
        self.ex = None
        self.done = False
        self.in_head = True
        if not self.fast and self.scan is not None:
            self.fast = True  # httptools completed its message: the next may be scanned
        backend = self.backend
        if ex.bound:  # Exchange.unbind(), inlined (tests/unit/test_inline_copies.py checks they agree)
            ex.bound = False
            backend.inflight -= 1
            self.worker.active -= 1
            if ex.curve is not None:
                ex.curve.done(ex.cls, ex.work, backend.inflight)
                ex.curve = None
        backend.responses[ex.status // 100] += 1
        if self.keep_alive and ex.body_done and not ex.upgrade:
            pool = self.pool  # Pool.release(), inlined (same test)
            idle = pool.idle
            if len(idle) < pool.max_idle and self.alive:
                self.idle_deadline = CLOCK.now + pool.idle_timeout
                self.reused = True
                idle.append(self)
            else:
                self.alive = False
                self.transport.close()
        else:
            self.alive = False
            if ex.body_done:
                self.transport.close()
            else:
                # Answered before the request body was all sent: the backend may
                # never read the rest, so what is queued for it is dropped too.
                self.transport.abort()
        ex.complete()

    def _head_too_large(self) -> None:
        self.raw = b""
        log("upstream_head_too_large", slot=self.worker.slot, backend=self.backend.name,
            limit=self.max_head)
        self._protocol_error()

    def _protocol_error(self) -> None:
        """The backend sent something that is not valid HTTP/1.1 (or too long a head)."""
        ex = self.ex
        self.transport.abort()
        if ex is None:
            return
        self.ex = None
        ex.unbind()
        if ex.response_started:
            ex.cut()
        else:
            # A failed attempt of that backend (passive health counts it).
            self.backend.record(ex.cls, monotonic() - ex.t0, True)
            ex.answer_error(502)

    def _switch_to_tunnel(self, rest: bytes) -> None:
        ex = self.ex
        self.ex = None
        ex.unbind()
        self.backend.responses[1] += 1
        Tunnel.open(ex, self, rest)  # sets self.tunnel: from now on only a byte pipe

    def abandon(self) -> None:
        """The client went away mid-exchange: this connection cannot be reused."""
        if self.ex is not None:
            self.ex.unbind()
            self.ex = None
        self.tunnel = None
        self.remaining = 0
        self.transport.abort()

