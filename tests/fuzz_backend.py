"""A raw TCP backend for the fuzz test (tests/process/test_fuzz.py).

It keeps exactly the bytes it received on every connection and parses them
with h11 (strict, independent of lb's parsers), so the test can check what lb
forwarded.  Each request is answered by a response *kind*, valid or broken on
purpose, chosen by the test per request target (`plan`); anything not planned
(a canary, a target a mutation changed) gets the plain valid answer.

A valid answer says which request it answers: `X-Echo` is a digest of the
target and the body, so the client can match every response to its request.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field

import h11

from tests.rawhttp import ThreadedServer

MAX_EVENT = 256 * 1024


def echo_token(target: bytes, body: bytes) -> str:
    """What a valid answer carries in X-Echo for the request (target, body)."""
    return "%s-%d-%08x" % (hashlib.sha1(target).hexdigest()[:16], len(body), zlib.crc32(body))


@dataclass
class Received:
    """One request as the backend parsed it."""

    conn: int
    method: bytes
    target: bytes
    headers: list  # (name as sent, value), in order
    version: bytes
    body: bytes = b""
    complete: bool = False
    kind: str = ""
    at: float = 0.0
    answered: bool = False  # answered before its body was read (EARLY_KINDS)

    def values(self, name: bytes) -> list:
        return [v for k, v in self.headers if k.lower() == name]


@dataclass
class ConnLog:
    id: int
    data: bytearray = field(default_factory=bytearray)
    requests: list = field(default_factory=list)
    error: str | None = None  # h11 refused the bytes lb sent
    eof_mid_message: bool = False  # lb closed inside a request (a legitimate abort)
    closed: bool = False


def _has_body(req: Received) -> bool:
    cl = req.values(b"content-length")
    return bool(req.values(b"transfer-encoding")) or (bool(cl) and cl[0].strip() not in (b"0", b""))


# -- responses --------------------------------------------------------------------

VALID_KINDS = ("ok", "chunked", "close_delimited", "http10", "interim_then_ok", "no_content",
               "keepalive_fields", "connection_named")
BROKEN_KINDS = ("bad_status", "flip_head", "cl_te", "double_cl", "short_close", "short_hang",
                "big_head", "many_1xx", "garbage_after", "extra_response", "bare_lf", "obs_fold",
                "huge_cl", "bad_chunk", "close_no_answer", "hang", "lookalike_te", "reset",
                "early", "early_close", "ctl_reason")
# Answered as soon as the head of a request with a body is in, before its body
# (a 413 or 401 as servers send them): then the body is read to its end
# ("early") or the connection closed under it ("early_close").
EARLY_KINDS = {"early", "early_close"}
_HANGING = {"short_hang", "hang"}


def _head(status: bytes, fields: list, version: bytes = b"HTTP/1.1", eol: bytes = b"\r\n") -> bytes:
    lines = [version + b" " + status] + [k + b": " + v for k, v in fields]
    return eol.join(lines) + eol + eol


def build_response(kind: str, req: Received, rng) -> tuple[bytes, bool]:
    """(bytes to send, close afterwards).  `rng` only varies the broken ones."""
    token = echo_token(req.target, req.body).encode()
    body = b"echo " + token + b"\n"
    head_req = req.method == b"HEAD"
    base = [(b"Server", b"fuzz"), (b"X-Echo", token)]
    send_body = b"" if head_req else body
    cl = (b"Content-Length", str(len(body)).encode())
    if kind == "ok":
        return _head(b"200 OK", base + [cl]) + send_body, False
    if kind == "chunked":
        chunks = b"" if head_req else b"%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (len(body), body)
        return _head(b"200 OK", base + [(b"Transfer-Encoding", b"chunked")]) + chunks, False
    if kind == "close_delimited":
        return _head(b"200 OK", base + [(b"Connection", b"close")]) + send_body, True
    if kind == "http10":
        return _head(b"200 OK", base + [cl], version=b"HTTP/1.0") + send_body, True
    if kind == "interim_then_ok":
        return (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
                + _head(b"200 OK", base + [cl]) + send_body), False
    if kind == "no_content":
        return _head(b"204 No Content", base), False
    if kind == "keepalive_fields":
        return _head(b"200 OK", base + [(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), cl]) \
            + send_body, False
    if kind == "connection_named":
        return _head(b"200 OK", base + [(b"Connection", b"X-Secret"), (b"X-Secret", b"1"), cl]) + send_body, False
    # -- broken on purpose --
    if kind == "bad_status":
        line = rng.choice([b"2x0 OK", b"20 OK", b"2000 OK", b"-200 OK", b"", b"200OK"])
        version = rng.choice([b"HTTP/1.1", b"HTTX/1.1", b"HTTP/1.x", b"HTTP/9.9"])
        return _head(line, base + [cl], version=version) + send_body, True
    if kind == "flip_head":
        raw = bytearray(_head(b"200 OK", base + [cl]))
        i = rng.randrange(len(raw) - 2)
        raw[i] = rng.choice(b"\x00\r\n :\x7f\xff_-5")
        return bytes(raw) + send_body, True
    if kind == "cl_te":
        return _head(b"200 OK", base + [cl, (b"Transfer-Encoding", b"chunked")]) \
            + (b"" if head_req else b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)), True
    if kind == "double_cl":
        return _head(b"200 OK", base + [cl, (b"Content-Length", str(len(body) + 3).encode())]) \
            + send_body + b"abc", True
    if kind in ("short_close", "short_hang"):
        return _head(b"200 OK", base + [(b"Content-Length", str(len(body) + 50).encode())]) + send_body, \
            kind == "short_close"
    if kind == "big_head":
        filler = [(b"X-Fill-%d" % i, b"f" * 1000) for i in range(rng.choice([20, 70, 200]))]
        return _head(b"200 OK", base + filler + [cl]) + send_body, True
    if kind == "many_1xx":
        return b"HTTP/1.1 100 Continue\r\n\r\n" * rng.choice([3, 50, 400]) \
            + _head(b"200 OK", base + [cl]) + send_body, False
    if kind == "garbage_after":
        return _head(b"200 OK", base + [cl]) + send_body + rng.choice([b"XYZ", b"\r\n", b"HTTP/1.1 2"]), True
    if kind == "extra_response":
        extra = _head(b"200 OK", [(b"X-Echo", b"unsolicited"), (b"Content-Length", b"6")]) + b"extra\n"
        return _head(b"200 OK", base + [cl]) + send_body + extra, True
    if kind == "bare_lf":
        return _head(b"200 OK", base + [cl], eol=b"\n") + send_body, True
    if kind == "obs_fold":
        return _head(b"200 OK", base + [(b"X-Folded", b"a\r\n b"), cl]) + send_body, False
    if kind == "huge_cl":
        return _head(b"200 OK", base + [(b"Content-Length", b"99999999999999999999999")]) + send_body, True
    if kind == "bad_chunk":
        return _head(b"200 OK", base + [(b"Transfer-Encoding", b"chunked")]) \
            + (b"" if head_req else b"zz\r\n" + body + b"\r\n0\r\n\r\n"), True
    if kind == "ctl_reason":  # a control character in the reason phrase
        return _head(b"200 " + rng.choice([b"\x00K", b"O\x01K", b"OK\x7f", b"O\x1bK"]), base + [cl]) + send_body, True
    if kind == "lookalike_te":
        return _head(b"200 OK", base + [(b"Transfer_Encoding", b"chunked"), cl]) + send_body, True
    if kind in EARLY_KINDS:
        return _head(b"200 OK", base + [cl]) + send_body, False
    if kind in ("close_no_answer", "reset", "hang"):
        return b"", kind != "hang"
    raise ValueError(kind)


# -- the server -------------------------------------------------------------------


class FuzzBackend(ThreadedServer):
    name = "fuzz"

    def __init__(self, rng) -> None:
        self.rng = rng
        self.conns: list[ConnLog] = []
        self.requests: list[Received] = []  # every request, in order of arrival
        self.plan: dict[bytes, str] = {}  # target -> response kind
        super().__init__(backlog=128)

    def handle(self, s: socket.socket) -> None:
        """One connection, on its own thread: logged in arrival order of its handler."""
        with self.lock:
            log = ConnLog(len(self.conns))
            self.conns.append(log)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._handle(s, log)

    def _recv(self, s: socket.socket, log: ConnLog) -> bytes:
        try:
            data = s.recv(262144)
        except OSError:
            data = b""
        log.data += data
        return data

    def _handle(self, s: socket.socket, log: ConnLog) -> None:
        s.settimeout(60)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_EVENT)
        req: Received | None = None
        try:
            while True:
                try:
                    ev = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    if "closed connection" in str(exc):
                        log.eof_mid_message = True  # lb gave up inside a request: allowed
                    else:
                        log.error = f"{exc} after {len(log.data)} bytes"
                    return
                if ev is h11.NEED_DATA:
                    data = self._recv(s, log)
                    conn.receive_data(data)
                    continue
                if isinstance(ev, h11.ConnectionClosed):
                    return
                if isinstance(ev, h11.Request):
                    req = Received(log.id, ev.method, ev.target, list(ev.headers.raw_items()),
                                   ev.http_version, at=time.monotonic())
                    with self.lock:
                        req.kind = self.plan.get(ev.target, "ok")
                        log.requests.append(req)
                        self.requests.append(req)
                    if req.kind in EARLY_KINDS and _has_body(req):
                        try:
                            if not self._answer_early(s, conn, req):
                                return
                        except OSError:
                            return
                    continue
                if isinstance(ev, h11.Data):
                    req.body += ev.data
                    continue
                if isinstance(ev, h11.EndOfMessage) or ev is h11.PAUSED:
                    if isinstance(ev, h11.EndOfMessage):
                        req.complete = True
                    if req.answered:  # early: the answer is out, the body now read
                        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                            return
                        conn.start_next_cycle()
                        req = None
                        continue
                    try:
                        if not self._answer(s, conn, req, log):
                            return
                    except OSError:
                        return  # lb closed the connection under the answer (its right)
                    req = None
        finally:
            log.closed = True
            try:
                s.close()
            except OSError:
                pass

    def _cuts(self, raw: bytes) -> list[int]:
        """Where an answer is split: only inside its first head or right after it,
        so bytes a broken answer has past its body arrive with the body (sent
        later, they would race with lb reusing the connection, in any proxy)."""
        end = raw.find(b"\r\n\r\n") + 4
        if end < 4 or self.rng.random() < 0.5:
            return []
        return sorted({self.rng.randint(1, end) for _ in range(self.rng.randint(1, 2))})

    def _answer_early(self, s: socket.socket, conn: h11.Connection, req: Received) -> bool:
        """Answer before the body; False if the connection is closed at once."""
        token = echo_token(req.target, b"").encode()
        body = b"too early " + token + b"\n"
        status = self.rng.choice([b"413 Payload Too Large", b"401 Unauthorized", b"200 OK"])
        s.sendall(_head(status, [(b"X-Echo", token), (b"Content-Length", b"%d" % len(body))]) + body)
        req.answered = True
        if req.kind == "early_close":
            return False
        conn.send(h11.Response(status_code=200, headers=[(b"Content-Length", b"0")]))
        conn.send(h11.EndOfMessage())
        return True

    def _answer(self, s: socket.socket, conn: h11.Connection, req: Received, log: ConnLog) -> bool:
        """Answer one complete request; False once the connection is done."""
        kind = req.kind
        if kind == "short_hang" and req.method == b"HEAD":
            # A HEAD answer has no body to cut short: it would be complete, and the
            # silence after it a pooled connection that no longer answers.
            kind = "short_close"
        if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL and kind == "switch":
            out = conn.send(h11.InformationalResponse(
                status_code=101, headers=[(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]))
            s.sendall(out)
            rest, _ = conn.trailing_data
            if rest:
                s.sendall(rest)
            while True:  # a byte tunnel: echo
                data = self._recv(s, log)
                if not data:
                    return False
                s.sendall(data)
        if kind == "switch":
            kind = req.kind = "ok"  # an upgrade the client did not ask for: answer plainly
        with self.lock:
            raw, close = build_response(kind, req, self.rng)
            cuts = self._cuts(raw)
        if kind == "reset":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        pos = 0
        for cut in cuts + [len(raw)]:
            if cut > pos:
                s.sendall(raw[pos:cut])
                pos = cut
                if cut < len(raw):
                    time.sleep(0.001)  # pacing, so lb reads the pieces apart
        if kind in _HANGING:
            # Never finish: read (and keep) whatever comes until lb gives up.
            while self._recv(s, log):
                pass
            return False
        if close:
            return False
        # Keep h11's state in step with the answer we wrote ourselves.
        conn.send(h11.Response(status_code=200, headers=[(b"Content-Length", b"0")]))
        conn.send(h11.EndOfMessage())
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        return True
