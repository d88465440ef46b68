"""Read-side flow control: a transport paused for several independent reasons.

A client connection can be paused because a pipelined request is queued, because
a request body is buffered while the upstream connection is being opened, or
because the upstream socket is not draining.  Reading resumes only when every
reason is gone.  Write-side back-pressure arrives as `pause_writing()` /
`resume_writing()` on the protocol and is mapped onto the peer's `ReadGate`.
"""

from __future__ import annotations

PIPELINE = 1  # a further request is queued behind the one in flight
BODY_BUFFER = 2  # request body buffered until the upstream connection is ready
PEER_FULL = 4  # the peer's transport is above its write high-water mark
UPGRADE = 8  # upgrade requested: hold tunnel bytes until the backend agrees
WRITE_LIMIT = 64 * 1024  # write buffer high-water mark for both sides


class ReadGate:
    __slots__ = ("transport", "reasons")

    def __init__(self, transport) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons:
            try:
                self.transport.pause_reading()
            except RuntimeError:  # closing
                pass
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons and not self.transport.is_closing():
                self.transport.resume_reading()
