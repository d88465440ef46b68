"""The client side of the fuzz test (tests/process/test_fuzz.py): send a case's bytes in
its splits over a real socket, and read lb's answers with h11 as the client
of the requests the strict reading saw, until lb closes, every request is
answered, or the bound passes."""

from __future__ import annotations

import re
import select
import socket
import time
from dataclasses import dataclass

import h11

from tests.fuzz_reference import Reference
from tests.fuzz_requests import Case

LB_TIMEOUT = 0.5  # lb's client and upstream timeouts in the fuzz test's config
HANG = 4.0  # no answer nor close this long after the last byte: lb hangs
GRACE = 0.1  # how long a connection ending mid-request is given before the client half-closes


@dataclass
class Answer:
    status: int
    headers: list
    body: bytes = b""
    complete: bool = False

    def header(self, name: bytes):
        vs = [v for k, v in self.headers if k.lower() == name]
        return vs[0] if vs else None


class ResponseReader:
    """lb's answers on one connection, read by h11 as the client of the requests
    the reference saw (HEAD and upgrades change how a response is framed)."""

    def __init__(self, ref: Reference) -> None:
        self.ref = ref
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 21)
        self.answers: list[Answer] = []
        self.error = ""
        self.switched = False
        self.tunnel = b""
        self.eof = False
        self.closed_after_message = False
        self.cur: Answer | None = None
        self.raw = b""  # everything received, for the failure report
        self.interim = 0  # 100 Continue answers seen
        self._ask()

    def _ask(self) -> None:
        i = len(self.answers)
        rq = self.ref.requests[i] if i < len(self.ref.requests) else None
        method = rq.method if rq is not None else b"GET"
        headers = [(b"Host", b"x")]
        if rq is not None and rq.upgrade:
            headers += [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]
        if method == b"CONNECT" or not re.fullmatch(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+", method):
            method = b"GET"
        self.conn.send(h11.Request(method=method, target=b"/", headers=headers))
        self.conn.send(h11.EndOfMessage())

    def feed(self, data: bytes) -> None:
        self.raw += data
        if self.error:
            return
        if self.switched:
            self.tunnel += data
            return
        if self.conn.their_state in (h11.MUST_CLOSE, h11.CLOSED) and data:
            self.error = f"bytes after a response that ended the connection: {data[:100]!r}"
            return
        self.conn.receive_data(data)
        if not data:
            self.eof = True
        while True:
            try:
                ev = self.conn.next_event()
            except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
                if self.eof and (self.cur is not None and "without sending complete" in str(exc)
                                 or self.cur is None and "ConnectionClosed" in str(exc)):
                    return  # closed, maybe inside a response: allowed (checked by the caller)
                self.error = f"malformed response stream: {exc}"
                return
            if ev is h11.NEED_DATA or isinstance(ev, h11.ConnectionClosed):
                return
            if ev is h11.PAUSED:
                self.switched = True
                self.tunnel += self.conn.trailing_data[0]
                return
            if isinstance(ev, h11.InformationalResponse):
                self.interim += ev.status_code == 100
                if ev.status_code == 101:
                    self.answers.append(Answer(101, list(ev.headers.raw_items()), complete=True))
                continue
            if isinstance(ev, h11.Response):
                self.cur = Answer(ev.status_code, list(ev.headers.raw_items()))
            elif isinstance(ev, h11.Data):
                self.cur.body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                self.cur.complete = True
                self.answers.append(self.cur)
                self.cur = None
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                    self._ask()
                else:
                    self.closed_after_message = True

    @property
    def finals(self) -> list[Answer]:
        return [a for a in self.answers if a.status >= 200 or a.status == 101]


@dataclass
class Outcome:
    reader: ResponseReader
    hung: bool = False
    reset: bool = False
    half_closed: bool = False
    no_continue: bool = False  # a valid Expect: 100-continue request got neither 100 nor an answer
    elapsed: float = 0.0
    send_error: str = ""


def drive(port: int, case: Case, ref: Reference, wait_for_lb: bool) -> Outcome:
    """Send the case's bytes in its splits, read everything lb answers, until lb
    closes, or every request is answered, or the bound passes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
    out = Outcome(ResponseReader(ref))
    rd = out.reader

    def pump(wait: float) -> bool:
        """Read what is there (waiting up to `wait`); False at EOF or reset."""
        r, _, _ = select.select([s], [], [], wait)
        if not r:
            return True
        try:
            data = s.recv(262144)
        except BlockingIOError:
            return True
        except ConnectionResetError:
            out.reset = True
            data = b""
        rd.feed(data)
        return bool(data)

    t0 = time.monotonic()
    open_ = True
    try:
        cuts, pos = [], 0
        for size in case.splits:
            pos += size
            cuts.append(pos)
        head_end = case.data.find(b"\r\n\r\n") + 4 if case.expect_wait else 0
        if head_end >= 4:
            cuts = sorted(set(cuts) | {head_end})
        pos = 0
        for cut in cuts:
            try:
                _send_all(s, case.data[pos:cut])
            except (BrokenPipeError, ConnectionResetError) as exc:
                out.send_error = str(exc)
                break
            pos = cut
            open_ = pump(0.002)  # also paces the pieces so lb reads them apart
            if cut == head_end:
                # A client that waits for 100 Continue before its body (lb sends
                # it when the request goes upstream), or for an answer instead.
                until = time.monotonic() + HANG
                while open_ and not rd.interim and not rd.finals and time.monotonic() < until:
                    open_ = pump(0.05)
                first = ref.requests[0] if ref.requests else None
                if (open_ and not rd.interim and not rd.finals and first is not None
                        and first in ref.valid_prefix and not first.upgrade):
                    out.no_continue = True
            if not open_:
                break
        sent_at = time.monotonic()
        deadline = sent_at + HANG
        n_valid = len(ref.valid_prefix)
        grace_end = sent_at + (HANG if wait_for_lb else GRACE)
        tunnel_sent = False
        while open_ and not rd.error:
            now = time.monotonic()
            if now > deadline:
                out.hung = True
                break
            if rd.switched:
                if not tunnel_sent and case.tunnel:
                    _send_all(s, case.tunnel)
                    tunnel_sent = True
                if rd.tunnel.startswith(ref.tail + case.tunnel):
                    break
            elif ref.end == "clean" and len(rd.finals) >= len(ref.requests) and not rd.closed_after_message \
                    and n_valid == len(ref.requests):
                break  # every request answered; the connection may stay open
            elif ref.end in ("partial", "error") and len(rd.finals) >= n_valid and now > grace_end \
                    and not out.half_closed:
                # lb waits for the rest of a request: say there is none (its timeout
                # is exercised by the cases that wait for it).
                out.half_closed = True
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    out.reset = True  # lb already reset the connection: it is closed
                    break
            open_ = pump(min(0.05, max(0.0, deadline - now)))
    finally:
        out.elapsed = time.monotonic() - t0
        s.close()
    return out


def _send_all(s: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    deadline = time.monotonic() + 2
    while view:
        try:
            n = s.send(view)
            view = view[n:]
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise BrokenPipeError("lb stopped reading") from None
            select.select([], [s], [], 0.05)
