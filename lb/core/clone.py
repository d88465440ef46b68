"""Shared state over ZeroMQ, after the ZeroMQ guide's Clone pattern.

A `Publisher` owns one piece of state (the routing table, the operator's
control state).  Every version carries `(epoch, seq)`: the epoch is drawn at
random when the publisher starts, the sequence grows by one per version.  It
PUBlishes each new version and answers snapshot requests on a ROUTER socket
with the latest one.

A `Subscriber` subscribes FIRST, then asks for a snapshot, and from then on
keeps a message only if it is newer than what it holds: same epoch and a
higher sequence, or a different epoch (the publisher restarted).  So a process
that starts (or restarts) gets the current state at once, and never goes back
to an older version because a PUB update and the snapshot crossed.

A subscription reaches the publisher some time after `connect` (longer when
the publisher binds after the subscriber connected: ZeroMQ retries every
100 ms), and an update published before it arrives is not delivered.  Until
its first PUB message proves the subscription live, a subscriber therefore
asks for a snapshot again every LIVE_RETRY seconds, so an update published in
that window reaches it within LIVE_RETRY, not at the next republish.

Both sides are non-blocking and never wait: `poll()` takes what has arrived.
Callers wire the sockets' file descriptors into their event loop (or call
`poll()` from a timer); ZeroMQ's descriptor is edge-triggered, so `poll()`
always drains until EAGAIN.
"""

from __future__ import annotations

import random
import time

import zmq

from lb.core.messages import SNAPSHOT_REQUEST

SNAPSHOT_RETRY = 1.0  # seconds without any state before asking again
LIVE_RETRY = 0.1  # seconds between snapshot requests until the subscription is live


def _socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    return s


class Publisher:
    def __init__(self, ctx: zmq.Context, pub: str, snapshot: str, topic: bytes) -> None:
        self.topic = topic
        self.epoch = random.getrandbits(48) or 1
        self.seq = 0
        self.latest: bytes | None = None
        self.pub = _socket(ctx, zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 64)
        self.pub.bind(pub)
        self.router = _socket(ctx, zmq.ROUTER)
        self.router.bind(snapshot)

    def next_version(self) -> tuple[int, int]:
        """The (epoch, seq) to stamp on the version about to be published."""
        self.seq += 1
        return self.epoch, self.seq

    def publish(self, payload: bytes) -> None:
        """Send an encoded message stamped with `next_version()`."""
        self.latest = payload
        try:
            self.pub.send_multipart((self.topic, payload), zmq.NOBLOCK)
        except zmq.Again:
            pass  # a subscriber too slow to keep up catches up on the next version

    def serve_snapshots(self) -> int:
        """Answer every pending snapshot request with the latest version."""
        n = 0
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return n
            if len(frames) < 2 or frames[-1] != SNAPSHOT_REQUEST:
                continue
            reply = self.latest if self.latest is not None else b""
            try:
                self.router.send_multipart((frames[0], self.topic, reply), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the requester went away
            n += 1

    def close(self) -> None:
        self.pub.close()
        self.router.close()


class Subscriber:
    """Holds the newest version of one publisher's state.

    `decode` turns a payload into a message with `epoch` and `seq` fields.
    """

    def __init__(self, ctx: zmq.Context, pub: str, snapshot: str, topic: bytes, decode) -> None:
        self.topic = topic
        self.decode = decode
        self.state = None
        self.epoch = 0
        self.seq = 0
        self.received = 0.0  # monotonic time the state last changed
        self.dropped = 0  # updates ignored because they were not newer
        self.bad = 0  # payloads that did not decode
        self.sub = _socket(ctx, zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.setsockopt(zmq.RCVHWM, 64)
        self.sub.connect(pub)  # subscribe first ...
        self.dealer = _socket(ctx, zmq.DEALER)
        self.dealer.connect(snapshot)
        self.asked = 0.0
        self.live = False  # a PUB message has arrived: the subscription is in place
        self._ask()  # ... then ask for the snapshot

    def _ask(self) -> None:
        self.asked = time.monotonic()
        try:
            self.dealer.send(SNAPSHOT_REQUEST, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def fds(self) -> tuple[int, int]:
        return self.sub.getsockopt(zmq.FD), self.dealer.getsockopt(zmq.FD)

    def offer(self, payload: bytes) -> bool:
        """Apply one version if it is newer than the one held.  True if kept."""
        if not payload:
            return False  # an empty snapshot: the publisher has nothing yet
        try:
            msg = self.decode(payload)
        except Exception:  # noqa: BLE001 - a bad payload must not stop the receiver
            self.bad += 1
            return False
        if msg.epoch == self.epoch and msg.seq <= self.seq:
            self.dropped += 1
            return False
        self.state = msg
        self.epoch = msg.epoch
        self.seq = msg.seq
        self.received = time.monotonic()
        return True

    def poll(self) -> bool:
        """Take everything that arrived.  True if the state changed."""
        changed = False
        while True:
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) == 2 and frames[0] == self.topic:
                changed |= self.offer(frames[1])
        while True:
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) == 2:
                self.live = True
                changed |= self.offer(frames[1])
        if not self.live:
            if time.monotonic() - self.asked > (LIVE_RETRY if self.state is not None else SNAPSHOT_RETRY):
                self._ask()
        return changed

    def close(self) -> None:
        self.sub.close()
        self.dealer.close()
