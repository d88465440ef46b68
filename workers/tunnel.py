"""Upgrades: an upgrade request waits for the backend's 101, then the client
connection and the backend connection become one byte pipe.

Between the upgrade request and the backend's answer nothing the client sends
is read or forwarded (`hold`): to a backend that answers anything but 101,
those bytes would be a request that skipped every rule.  On 101, `Tunnel.open`
hands the held bytes to the backend and both protocols point at the tunnel,
which relays in both directions with flow control and one idle timer (the
client connection's deadline, renewed by bytes either way).  Either side
closing closes the other.
"""

from __future__ import annotations

from workers import flow
from workers.timers import CLOCK


def requested(conn, ex, rest: bytes) -> None:
    """httptools stopped at the end of `ex`'s upgrade request head on `conn`;
    `rest`: what followed it in the same read."""
    conn.upgrading = ex
    conn.gate.pause(flow.UPGRADE)  # nothing more is read until the backend answers
    if rest:
        hold(conn, ex, rest)
    first = conn.ex  # the upgrade request itself, or a request before it whose
    if first is not None and first.pending and first.upstream is not None:
        first.flush()  # body (or head) this read brought


def hold(conn, ex, data: bytes) -> None:
    """Bytes after `ex`'s upgrade request on `conn`: kept (reading is paused, so
    at most a read or two) until a 101 opens the tunnel, dropped on any other answer."""
    if ex.held is None:
        ex.held = []
    ex.held.append(data)
    conn.gate.pause(flow.UPGRADE)


class Tunnel:
    __slots__ = ("client", "backend", "idle")

    def __init__(self, client, backend) -> None:
        self.client = client  # the Downstream
        self.backend = backend  # the UpstreamConnection
        self.idle = client.worker.t_tunnel_idle

    @classmethod
    def open(cls, ex, up, rest: bytes) -> "Tunnel":
        """`up` answered `ex`'s upgrade request with 101 (its head already
        relayed); `rest`: tunnel bytes that came in the same read."""
        conn = ex.conn
        t = cls(conn, up)
        up.tunnel = conn.tunnel = t
        if rest:
            conn.transport.write(rest)
        conn.ex = None
        conn.upgrading = None
        conn.deadline = CLOCK.tick() + t.idle
        held = ex.held
        if held:  # what the client sent after its upgrade request, now tunnel bytes
            ex.held = None
            up.transport.writelines(held)
        conn.gate.resume(flow.BODY_BUFFER | flow.PIPELINE | flow.UPGRADE)
        return t

    def from_client(self, data: bytes) -> None:
        self.backend.transport.write(data)
        self.client.deadline = CLOCK.now + self.idle

    def from_backend(self, data: bytes) -> None:
        self.client.transport.write(data)
        self.client.deadline = CLOCK.now + self.idle

    def client_full(self, full: bool) -> None:
        """The client's send buffer is above (or back under) its limit."""
        gate = self.backend.gate
        gate.pause(flow.PEER_FULL) if full else gate.resume(flow.PEER_FULL)

    def backend_full(self, full: bool) -> None:
        gate = self.client.gate
        gate.pause(flow.PEER_FULL) if full else gate.resume(flow.PEER_FULL)

    # (Each side keeps its `tunnel` until its own connection_lost: bytes that
    # arrive meanwhile must not reach anything but the tunnel.)

    def client_closed(self) -> None:
        self.backend.transport.close()

    def backend_closed(self) -> None:
        self.client.transport.close()
