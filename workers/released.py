"""A stand-in for the transport of a connection that is gone.

A connection's protocol and its httptools parser refer to each other, so a
closed connection's objects wait for the cycle collector, which runs rarely
(workers run with a high threshold).  Whatever they hold waits with them: a
TLS transport holds its SSL protocol (with a 256 KiB read buffer), the SSL
object and its buffers.  `connection_lost` therefore swaps the transport for
CLOSED, which answers every call a late callback may still make as a closed
transport would, and holds nothing.
"""

from __future__ import annotations


class _Closed:
    __slots__ = ()

    def write(self, data) -> None:
        pass

    def writelines(self, data) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name, default=None):
        return default


CLOSED = _Closed()
