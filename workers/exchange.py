"""One request in flight, from its parsed head to the last byte of its response."""

from __future__ import annotations

from workers.http import IDEMPOTENT


class Exchange:
    # Class-level defaults: __init__ sets only what differs per request, which
    # is measurably cheaper than assigning two dozen slots on every request.
    buffered = 0  # size of the body bytes in `pending`
    body_done = False
    body_bytes = 0
    expect_continue = False
    backend = None
    bound = False  # counted in backend.inflight
    upstream = None
    connecting = None  # the connect task while a new upstream connection opens
    tried = None  # backends already attempted (retries)
    response_started = False
    status = 0
    t0 = 0.0
    error = 0  # a queued lb-generated error (status) instead of a forwarded request

    def __init__(self, conn, method, head, has_body, chunked, keep_alive, http10, upgrade) -> None:
        self.conn = conn  # the Downstream that owns it
        self.method = method
        self.head = head  # the request head as forwarded (kept for retries)
        self.pending = [head]  # bytes waiting to go upstream
        self.head_request = method == b"HEAD"
        self.has_body = has_body
        self.chunked = chunked
        self.keep_alive = keep_alive  # the client connection may carry another request
        self.http10 = http10
        self.upgrade = upgrade

    @classmethod
    def rejection(cls, conn, status: int) -> "Exchange":
        ex = cls(conn, b"", b"", False, False, False, False, False)
        ex.error = status
        ex.body_done = True
        return ex

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT

    def unbind(self) -> None:
        """Stop counting this exchange against its backend's in-flight requests."""
        if self.bound:
            self.bound = False
            self.backend.inflight -= 1

    def on_connected(self, task) -> None:
        self.conn.upstream_connected(self, task)
