"""A msgpack array of equal-length arrays of float64, read into a numpy
matrix straight from its bytes.

A table's per-class rows (`lb.core.messages.Table`: weights, latency, error,
cost) are the bulk of it: 8 classes x 256 backends are 8,192 floats, each
nine bytes on the wire (the 0xcb tag, then the big-endian double).  Decoding
them into Python floats and converting those to numpy again cost a worker
about 0.1 ms of event-loop time per table at that size, 0.8 ms at 1,000
backends (bench/inference_bench.py); read as a structured numpy view of the
same bytes, the rows are one copy.

Anything else (ragged rows, integers, a float32, an empty row among full
ones) is not this fast layout: `float_rows` returns None and the caller
decodes the bytes the ordinary way.
"""

from __future__ import annotations

import numpy as np

FLOAT64 = 0xCB  # msgpack's tag of a 64-bit float


def _header(buf: memoryview, at: int) -> tuple[int, int]:
    """(element count, header length) of the msgpack array that starts at
    `at`, or (-1, 0) if none starts there."""
    if at >= len(buf):
        return -1, 0
    tag = buf[at]
    if 0x90 <= tag <= 0x9F:  # fixarray
        return tag - 0x90, 1
    if tag == 0xDC and at + 3 <= len(buf):  # array 16
        return int.from_bytes(buf[at + 1:at + 3], "big"), 3
    if tag == 0xDD and at + 5 <= len(buf):  # array 32
        return int.from_bytes(buf[at + 1:at + 5], "big"), 5
    return -1, 0


def float_rows(raw) -> np.ndarray | None:
    """The (rows, columns) float64 matrix that the msgpack bytes `raw` hold
    (any buffer: bytes, msgspec.Raw), or None unless they are an array of
    arrays that all have the same length and hold only 64-bit floats.  An
    empty outer array is a (0, 0) matrix."""
    buf = memoryview(raw).cast("B")
    rows, outer = _header(buf, 0)
    if rows < 0:
        return None
    if rows == 0:
        return np.zeros((0, 0)) if len(buf) == outer else None
    cols, inner = _header(buf, outer)
    if cols <= 0 or len(buf) != outer + rows * (inner + 9 * cols):
        return None
    layout = np.dtype([("head", f"V{inner}"), ("cell", [("tag", "u1"), ("value", ">f8")], (cols,))])
    view = np.frombuffer(buf, dtype=layout, offset=outer)
    heads = view["head"]
    if not (view["cell"]["tag"] == FLOAT64).all() or not (heads == heads[0]).all():
        return None
    return view["cell"]["value"].astype(np.float64)
