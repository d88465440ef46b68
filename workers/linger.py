"""Closing a client connection after an error answer without losing the answer.

A socket closed with bytes still unread in its receive buffer sends a reset
(RST) instead of a FIN, and a reset that reaches the client before it has read
the answer destroys the answer in the client's receive buffer.  A client that
is still sending (the body of a rejected request, pipelined requests) is
exactly that case.  After an error answer (400, 408, 413, 431...) lb therefore
half-closes (FIN once the answer is sent), keeps reading and dropping what the
client still sends, and closes when the client closes, after LINGER_BYTES more
bytes, or after LINGER_TIME, whichever comes first: nginx's lingering close,
with a byte bound as well so a fast sender cannot keep a worker busy.
"""

from __future__ import annotations

from workers import flow
from workers.timers import CLOCK

LINGER_TIME = 2.0  # seconds: long enough for the answer to reach the client
LINGER_BYTES = 1 << 20  # bytes read and dropped at most
_ALL_REASONS = flow.PIPELINE | flow.BODY_BUFFER | flow.PEER_FULL | flow.UPGRADE


def linger(conn) -> None:
    """Half-close `conn` (a Downstream whose answer is written) and drain it, bounded.

    Its `data_received` drops what arrives (the connection is `broken`) and
    counts it against `linger_left`; its deadline sweep closes it once the
    time is up (nothing is in flight then, so the sweep treats it as idle).
    """
    t = conn.transport
    if t.is_closing() or not t.can_write_eof():
        t.close()
        return
    t.write_eof()
    conn.linger_left = LINGER_BYTES
    conn.deadline = CLOCK.tick() + LINGER_TIME
    conn.gate.resume(_ALL_REASONS)
