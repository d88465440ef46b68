"""Structured logs: one JSON object per line on stderr.

With `lb run --log-file PATH` the supervisor points its stderr (and so every
child's) at PATH, opened for appending, and exports LB_LOG_FILE.  SIGUSR1 makes
each process reopen PATH onto its stderr (`reopen()`), for log rotation:
rename the file, send SIGUSR1 to the supervisor, which reopens and forwards
the signal to its children."""

from __future__ import annotations

import os
import sys
import time

import msgspec

_encode = msgspec.json.Encoder().encode
_stream = sys.stderr


LOG_FILE_ENV = "LB_LOG_FILE"


def reopen() -> bool:
    """Point stderr at $LB_LOG_FILE again (after a rotation).  False if unset
    or if the file cannot be opened (stderr then stays where it was)."""
    path = os.environ.get(LOG_FILE_ENV)
    if not path:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    except OSError as exc:
        log("log_reopen_failed", path=path, error=exc.strerror or str(exc))
        return False
    try:
        _stream.flush()
    except (OSError, ValueError):
        pass
    os.dup2(fd, 2)
    os.close(fd)
    return True


def log(event: str, **fields) -> None:
    """Write one event.  Never raises: a broken stderr must not stop the proxy."""
    record = {"ts": round(time.time(), 3), "event": event, "pid": os.getpid()}
    record.update(fields)
    try:
        _stream.buffer.write(_encode(record) + b"\n")
        _stream.flush()
    except (OSError, ValueError, AttributeError):
        pass


class Throttle:
    """At most one line per `seconds` for a recurring event: `due()` says
    whether this occurrence may log (and starts the next interval if so)."""

    __slots__ = ("seconds", "last")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last = -float("inf")

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True
