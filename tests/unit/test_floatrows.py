"""A table's rows read from their msgpack bytes (lb/core/floatrows.py) against
msgspec's own decoding, and a worker's Table (lb.core.messages.decode_table_arrays)
against the ordinary one: the same values, or the same error."""

import random
import struct

import msgspec
import numpy as np
import pytest

from lb.core import messages as m
from lb.core.floatrows import float_rows
from workers.rows import class_rows


def rows_of(rng: random.Random, n_rows: int, n_cols: int) -> list[list[float]]:
    special = [0.0, -0.0, 1.0, 1e-300, 5e-324, float("inf"), -1.5, 1e300]
    return [[rng.choice(special) if rng.random() < 0.1 else rng.uniform(-1e3, 1e3) for _ in range(n_cols)]
            for _ in range(n_rows)]


@pytest.mark.parametrize("n_cols", [1, 2, 15, 16, 17, 256, 1000, 70000])
def test_full_float_rows_read_as_msgspec_decodes_them(n_cols):
    rng = random.Random(n_cols)
    for n_rows in (1, 3, 16, 17) if n_cols < 70000 else (1, 2):
        rows = rows_of(rng, n_rows, n_cols)
        got = float_rows(msgspec.msgpack.encode(rows))
        assert got is not None and got.dtype == np.float64 and got.shape == (n_rows, n_cols)
        want = np.array(msgspec.msgpack.decode(msgspec.msgpack.encode(rows)), dtype=np.float64)
        assert np.array_equal(got.view(np.int64), want.view(np.int64))  # bit for bit (-0.0 too)


def test_nan_survives():
    got = float_rows(msgspec.msgpack.encode([[float("nan"), 1.0]]))
    assert np.isnan(got[0, 0]) and got[0, 1] == 1.0


@pytest.mark.parametrize("value", [
    [[1.0, 2.0], [3.0]],  # ragged
    [[1.0, 2.0], []],  # an empty row among full ones
    [[]],  # one empty row
    [[1.0, 2]],  # an integer
    [[1.0, "x"]],  # not a number
    [[1.0, None]],
    [1.0, 2.0],  # not rows
    {"a": 1.0},
    1.0,
    [[[1.0]]],
])
def test_anything_else_is_left_to_msgspec(value):
    assert float_rows(msgspec.msgpack.encode(value)) is None


def test_no_rows_is_an_empty_matrix():
    assert float_rows(msgspec.msgpack.encode([])).shape == (0, 0)


def test_float32_and_truncated_bytes_are_refused():
    f32 = b"\x91\x92" + b"\xca" + struct.pack(">f", 1.0) + b"\xca" + struct.pack(">f", 2.0)
    assert msgspec.msgpack.decode(f32) == [[1.0, 2.0]]
    assert float_rows(f32) is None
    blob = msgspec.msgpack.encode([[1.0, 2.0], [3.0, 4.0]])
    for cut in range(len(blob)):
        assert float_rows(blob[:cut]) is None
    assert float_rows(blob + b"\x00") is None
    assert float_rows(b"") is None


def test_array16_header_for_a_short_row_still_reads():
    # 0xdc 00 02: an array 16 that holds two (legal, if not the shortest form)
    blob = b"\x92" + (b"\xdc\x00\x02" + b"\xcb" + struct.pack(">d", 1.5) + b"\xcb" + struct.pack(">d", -2.0)) * 2
    assert msgspec.msgpack.decode(blob) == [[1.5, -2.0], [1.5, -2.0]]
    assert float_rows(blob).tolist() == [[1.5, -2.0], [1.5, -2.0]]


def table(**rows) -> m.Table:
    return m.Table(epoch=7, seq=3, ts=12.5, interval=0.1, model_version="v", mode="learned", reason="",
                   backends=["a", "b", "c"], classes=["default", "heavy"], exploration=0.01,
                   error_weight=[0.5, 0.25, 1.0], **rows)


FULL = dict(weights=[[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]], latency=[[0.01, 0.02, 0.03], [0.1, 0.2, 0.3]],
            error=[[0.0, 0.1, 0.2], [0.0, 0.0, 0.5]], cost=[[0.01, 0.03, 0.1], [0.1, 0.2, 80.0]])


@pytest.mark.parametrize("rows", [
    FULL,
    dict(weights=FULL["weights"]),  # the defaults: no latency, error or cost
    dict(FULL, cost=[[0.01, 0.03, 0.1], []]),  # ragged: lists, as the ordinary decoder gives
    dict(FULL, weights=[[1, 0, 0], [0, 0, 1]]),  # integers
])
def test_a_workers_table_holds_what_the_ordinary_decoder_reads(rows):
    blob = m.encode(table(**rows))
    want = m.table_decoder.decode(blob)
    got = m.decode_table_arrays(blob)
    for f in msgspec.structs.fields(m.Table):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name in m.TABLE_ROWS:
            if isinstance(a, np.ndarray):
                assert a.shape == (len(b), len(b[0]) if b else 0)
                a = a.tolist()
            assert a == b, f.name
        else:
            assert a == b, f.name
    # and a worker reads the same class rows from either
    for name in ("weights", "latency", "cost"):
        for fill in (0.0, np.nan):
            x = class_rows(got.classes, getattr(got, name), ["heavy", "default", "other"], 3, fill)
            y = class_rows(want.classes, getattr(want, name), ["heavy", "default", "other"], 3, fill)
            assert np.array_equal(x, y, equal_nan=True), name


def test_a_bad_table_fails_as_the_ordinary_decoder_fails():
    good = msgspec.msgpack.decode(m.encode(table(**FULL)))
    for key, value in [("latency", [["slow", 1.0, 2.0]]), ("weights", "x"), ("seq", "three")]:
        blob = msgspec.msgpack.encode(dict(good, **{key: value}))
        with pytest.raises(msgspec.ValidationError):
            m.table_decoder.decode(blob)
        with pytest.raises(msgspec.ValidationError):
            m.decode_table_arrays(blob)
    with pytest.raises(msgspec.DecodeError):
        m.decode_table_arrays(m.encode(table(**FULL))[:-3])
