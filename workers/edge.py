"""What each listener serves besides plain HTTP: HTTPS, and the redirect to it.

An HTTPS connection starts as `TLSAccept`, which puts uvloop's TLS protocol
between the socket and a `TLSDownstream` (`start_tls`, also used after a
PROXY protocol header).  Until its handshake ends the connection is in the
worker's `pending` set: it counts against `limits.max_connections` and a
draining worker waits for it, although no HTTP protocol has seen it yet.
"""

from __future__ import annotations

import asyncio

from uvloop.loop import SSLProtocol

from workers.downstream import Downstream
from workers.exchange import Exchange
from workers.http import DATE, XFP_HTTPS, redirect_host, redirect_target

_FEED = 16384  # bytes handed to the TLS protocol at a time


def start_tls(worker, transport, app, ctx, timeout: float, rest: bytes = b"") -> None:
    """Run the server side of a TLS handshake on `transport`, then serve `app`
    over it; `rest`: bytes of the handshake already read from the socket."""
    worker.pending.add(transport)
    waiter = worker.loop.create_future()
    waiter.add_done_callback(lambda fut: worker.handshake_over(transport, fut))
    ssl_proto = SSLProtocol(worker.loop, app, ctx, waiter, server_side=True,
                            ssl_handshake_timeout=timeout)
    transport.set_protocol(ssl_proto)
    ssl_proto.connection_made(transport)
    for i in range(0, len(rest), _FEED):
        piece = rest[i:i + _FEED]
        ssl_proto.get_buffer(len(piece))[:len(piece)] = piece
        ssl_proto.buffer_updated(len(piece))


class TLSAccept(asyncio.Protocol):
    """The HTTPS listener's protocol factory product: hands each new
    connection to a TLS handshake for a TLSDownstream."""

    __slots__ = ("worker",)

    def __init__(self, worker) -> None:
        self.worker = worker

    def connection_made(self, transport) -> None:
        w = self.worker
        start_tls(w, transport, TLSDownstream(w), w.tls_ctx, w.cfg.tls.handshake_timeout)
        w.listener.accepted()


class TLSDownstream(Downstream):
    """A client connection on the HTTPS listener: the same protocol over the
    decrypted bytes (the TLS transport is uvloop's), X-Forwarded-Proto https."""

    __slots__ = ()
    XFP = XFP_HTTPS


class RedirectDownstream(Downstream):
    """The plain listener with `tls.redirect_http`: each request, read and
    checked as any other, is answered with a redirect to the same host and
    target over https (301 for GET and HEAD, 308 for the rest, which keeps
    the method and body), and never sent to a backend."""

    __slots__ = ()

    def __init__(self, worker) -> None:
        super().__init__(worker)
        self.scanner = None  # the head goes through httptools: the forwarded head is not used
        self.fast = False
        self.dispatch = self._redirect

    def _start(self, ex: Exchange) -> None:
        ex.expect_continue = False  # no 100 Continue: the answer comes before any body
        super()._start(ex)

    def _redirect(self, ex: Exchange) -> None:
        w = self.worker
        host = redirect_host(ex.head)
        if host in UNSPECIFIED:  # no Host (HTTP/1.0): lb's own listen address is no name to send
            self.write_error(ex, 400)
            return
        ex.status = status = 301 if ex.method in (b"GET", b"HEAD") else 308
        close = not (ex.keep_alive and ex.body_done) or ex.upgrade or w.draining
        ex.keep_alive = not close
        location = b"https://" + host + w.redirect_port + redirect_target(ex.head)
        self.transport.write(DATE.redirect(status, location, close=close, head_only=ex.head_request))
        self.response_done(ex)


UNSPECIFIED = frozenset((b"0.0.0.0", b"[::]", b"[0:0:0:0:0:0:0:0]"))
