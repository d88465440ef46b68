"""Clone pattern (lb/core/clone.py) through real ZeroMQ sockets: snapshot, sequencing, epochs."""

from __future__ import annotations

import time

import pytest
import zmq

from lb.core.clone import Publisher, Subscriber
from lb.core.messages import TOPIC_TABLE, Table, encode, endpoints, table_decoder


def table(epoch: int, seq: int, tag: str = "") -> bytes:
    return encode(Table(epoch=epoch, seq=seq, ts=time.time(), interval=0.1, model_version=tag, mode="learned",
                        reason="", backends=["a"], classes=["default"], weights=[[1.0]]))


@pytest.fixture
def ep(tmp_path):
    return endpoints(str(tmp_path))


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def pump(pub: Publisher | None, sub: Subscriber, until, timeout: float = 3.0) -> bool:
    """Serve snapshots and poll the subscriber until `until()` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pub is not None:
            pub.serve_snapshots()
        sub.poll()
        if until():
            return True
        time.sleep(0.005)
    return False


def publish(pub: Publisher, tag: str = "") -> tuple[int, int]:
    epoch, seq = pub.next_version()
    pub.publish(table(epoch, seq, tag))
    return epoch, seq


def test_snapshot_before_first_table_then_updates(ctx, ep):
    pub = Publisher(ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE)
    sub = Subscriber(ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE, table_decoder.decode)
    try:
        # the publisher answers the snapshot request with "nothing yet": no state, no error
        assert pump(pub, sub, lambda: False, timeout=0.3) is False
        assert sub.state is None and sub.bad == 0
        time.sleep(0.1)  # let the SUB connection settle before the first update
        publish(pub, "first")
        assert pump(pub, sub, lambda: sub.state is not None)
        assert (sub.epoch, sub.seq, sub.state.model_version) == (pub.epoch, 1, "first")
    finally:
        sub.close()
        pub.close()


def test_late_subscriber_gets_current_state_from_snapshot(ctx, ep):
    pub = Publisher(ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE)
    try:
        for i in range(3):
            publish(pub, f"v{i + 1}")
        # no PUB update will come: only the snapshot can deliver seq 3
        sub = Subscriber(ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE, table_decoder.decode)
        assert pump(pub, sub, lambda: sub.state is not None, timeout=2.0)
        assert (sub.seq, sub.state.model_version) == (3, "v3")
        sub.close()
    finally:
        pub.close()


def test_older_updates_are_dropped(ctx, ep):
    pub = Publisher(ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE)
    sub = Subscriber(ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE, table_decoder.decode)
    try:
        time.sleep(0.1)
        for _ in range(5):
            publish(pub, "new")
        assert pump(pub, sub, lambda: sub.seq == 5)
        # an older version of the same epoch arrives late (e.g. it crossed the snapshot)
        pub.publish(table(pub.epoch, 4, "old"))
        pub.publish(table(pub.epoch, 5, "dup"))
        assert pump(pub, sub, lambda: sub.dropped >= 2)
        assert (sub.seq, sub.state.model_version) == (5, "new")
        # and a garbage payload is counted, not applied
        pub.publish(b"\xc1 not msgpack")
        assert pump(pub, sub, lambda: sub.bad >= 1)
        assert sub.seq == 5
    finally:
        sub.close()
        pub.close()


def test_publisher_restart_with_new_epoch(ctx, ep):
    pub = Publisher(ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE)
    sub = Subscriber(ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE, table_decoder.decode)
    try:
        time.sleep(0.1)
        for _ in range(10):
            publish(pub, "before")
        assert pump(pub, sub, lambda: sub.seq == 10)
        old_epoch = pub.epoch
        pub.close()
        pub = Publisher(ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE)
        assert pub.epoch != old_epoch
        deadline = time.monotonic() + 3
        # the SUB reconnects by itself; keep publishing until the new epoch gets through
        while sub.epoch != pub.epoch and time.monotonic() < deadline:
            publish(pub, "after")
            pump(pub, sub, lambda: sub.epoch == pub.epoch, timeout=0.05)
        assert sub.epoch == pub.epoch
        assert sub.state.model_version == "after"
        assert sub.seq < 10  # a lower sequence is accepted because the epoch changed
    finally:
        sub.close()
        pub.close()
