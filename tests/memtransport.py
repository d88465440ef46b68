"""An in-memory transport for driving the data plane's protocols without
sockets (tests/unit/test_fastpath.py, tests/unit/test_inline_copies.py):
it keeps what is written and whether it was closed or aborted."""

from __future__ import annotations


class Transport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data) -> None:
        self.out.append(bytes(data))

    def writelines(self, parts) -> None:
        self.out.append(b"".join(parts))

    def set_write_buffer_limits(self, *a, **k) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return ("10.1.2.3", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    write_eof = close  # the client sees the end either way (workers/linger.py)
