"""Structured logs: one JSON object per line on stderr."""

from __future__ import annotations

import os
import sys
import time

import msgspec

_encode = msgspec.json.Encoder().encode
_stream = sys.stderr


def log(event: str, **fields) -> None:
    """Write one event.  Never raises: a broken stderr must not stop the proxy."""
    record = {"ts": round(time.time(), 3), "event": event, "pid": os.getpid()}
    record.update(fields)
    try:
        _stream.buffer.write(_encode(record) + b"\n")
        _stream.flush()
    except (OSError, ValueError, AttributeError):
        pass
