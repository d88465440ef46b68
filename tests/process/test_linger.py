"""An error answer survives the close that follows it.

lb answers a bad request (400, 408, 413, 431...) and closes.  If the client is
still sending (the body of the rejected request, pipelined requests), closing
with unread bytes makes the kernel send a reset, and a reset that reaches the
client first destroys the answer in its receive buffer.  lb lingers instead:
half-close after the answer, read and drop what still comes, close when the
client does or after a bounded time and number of bytes (workers/linger.py).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from workers.linger import LINGER_BYTES, LINGER_TIME

PATHS = {"c": {}, "python": {"LB_NO_FASTPATH": "1"}}
# Rejected at once (a Transfer-Encoding look-alike), with a body still coming.
BAD_HEAD = b"POST /up HTTP/1.1\r\nHost: lb.test\r\nTransfer_Encoding: chunked\r\nContent-Length: %d\r\n\r\n"


@pytest.fixture(params=PATHS)
def lb_both(request, lb_factory, backend):
    return lb_factory([backend], env=PATHS[request.param])


class Sender(threading.Thread):
    """Sends `total` bytes (None: until the peer stops it) on a socket; records how it ended."""

    def __init__(self, sock: socket.socket, data: bytes, total: int | None) -> None:
        super().__init__(daemon=True)
        self.sock, self.data, self.total = sock, data, total
        self.sent = 0
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        piece = b"x" * 65536
        try:
            self.sock.sendall(self.data)
            while self.total is None or self.sent < self.total:
                n = len(piece) if self.total is None else min(len(piece), self.total - self.sent)
                self.sock.sendall(piece[:n])
                self.sent += n
        except OSError as e:
            self.error = e
        finally:
            self.done.set()


def _read_all(sock: socket.socket, deadline: float) -> tuple[bytes, str]:
    got = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got, "reset"
        except socket.timeout:
            return got, "open"
        if not chunk:
            return got, "eof"
        got += chunk


def test_error_answer_reaches_a_client_still_sending(lb_both):
    # 256 KiB of body after a rejected head: far more than lb reads before
    # it answers, far less than the linger bound.
    body = 256 * 1024
    assert body < LINGER_BYTES
    for _ in range(3):  # a reset is a race: try it a few times
        s = socket.create_connection(("127.0.0.1", lb_both.port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            sender = Sender(s, BAD_HEAD % body, body)
            sender.start()
            assert sender.done.wait(10), "the client could not send its body"
            got, end = _read_all(s, time.monotonic() + 10)
        finally:
            s.close()
        assert got.startswith(b"HTTP/1.1 400 "), (got[:100], end, sender.error)
        assert end == "eof" and sender.error is None, (end, sender.error)


def test_lingering_is_bounded_in_bytes(lb_both):
    s = socket.create_connection(("127.0.0.1", lb_both.port), timeout=10)
    try:
        sender = Sender(s, BAD_HEAD % (1 << 30), None)  # sends until lb stops it
        sender.start()
        assert sender.done.wait(10 + LINGER_TIME), "lb kept reading past its linger bounds"
        assert isinstance(sender.error, (ConnectionResetError, BrokenPipeError)), sender.error
        # what lb dropped is bounded (the kernel buffers on both sides add to it)
        assert sender.sent < LINGER_BYTES + (16 << 20), sender.sent
    finally:
        s.close()


def test_lingering_is_bounded_in_time(lb_both):
    # A client that sends the rest of a rejected request and then neither
    # closes nor sends more: after the answer and its FIN, lb closes the
    # connection for good within LINGER_TIME (a byte sent then is refused).
    s = socket.create_connection(("127.0.0.1", lb_both.port), timeout=10)
    try:
        s.sendall(BAD_HEAD % 10 + b"0123456789")
        t0 = time.monotonic()
        got, end = _read_all(s, t0 + 5)
        assert got.startswith(b"HTTP/1.1 400 ") and end == "eof", (got[:100], end)
        deadline = t0 + LINGER_TIME + 5
        refused = None
        while refused is None and time.monotonic() < deadline:
            try:
                s.send(b"x")
                time.sleep(0.05)  # polling interval while waiting for the close
            except OSError as e:
                refused = e
        assert refused is not None, "lb still reads the connection after its linger time"
    finally:
        s.close()


def test_body_limit_answer_reaches_a_client_still_sending(lb_factory, backend):
    # 413 found inside a chunked body (the head was valid and forwarded): the
    # rest of the body is still coming when lb answers.
    lb = lb_factory([backend], extra="[limits]\nmax_body_size = 1000")
    head = b"POST /up HTTP/1.1\r\nHost: lb.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (4096, b"y" * 4096)
    body = chunk * 64  # 256 KiB
    s = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    try:
        sender = Sender(s, head + body, 0)
        sender.start()
        assert sender.done.wait(10), "the client could not send its body"
        got, end = _read_all(s, time.monotonic() + 10)
    finally:
        s.close()
    assert got.startswith(b"HTTP/1.1 413 "), (got[:100], end, sender.error)
    assert end == "eof" and sender.error is None, (end, sender.error)
