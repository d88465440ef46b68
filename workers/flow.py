"""Read-side flow control: a transport paused for several independent reasons.

A client connection can be paused because a pipelined request is queued, because
a request body is buffered while the upstream connection is being opened, or
because the upstream socket is not draining.  Reading resumes only when every
reason is gone.  Write-side back-pressure arrives as `pause_writing()` /
`resume_writing()` on the protocol and is mapped onto the peer's `ReadGate`.
"""

from __future__ import annotations

import socket

PIPELINE = 1  # a further request is queued behind the one in flight
BODY_BUFFER = 2  # request body buffered until the upstream connection is ready
PEER_FULL = 4  # the peer's transport is above its write high-water mark
UPGRADE = 8  # upgrade requested: hold tunnel bytes until the backend agrees
WRITE_LIMIT = 64 * 1024  # write buffer high-water mark for both sides

# TCP states (Linux tcp_states.h) in which the peer has closed its side or
# reset the connection: TCP_CLOSE_WAIT, TCP_CLOSE.
PEER_CLOSED_STATES = (8, 7)
TCP_INFO = getattr(socket, "TCP_INFO", None)


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

    def peer_gone(self) -> bool:
        """Reading is paused, so an end of file or a reset from the peer goes
        unseen (and what its connection holds stays held): ask the kernel."""
        if TCP_INFO is None:
            return False
        sock = self.transport.get_extra_info("socket")
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)
        except (OSError, AttributeError):
            return False
        return bool(state) and state[0] in PEER_CLOSED_STATES
