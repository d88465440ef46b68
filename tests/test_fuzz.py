"""Fuzz: mutated requests, sent in random splits, and broken backend responses,
through a real lb process on both parse paths (C fast path, LB_NO_FASTPATH=1).

Bounded and seeded: LB_FUZZ_SEED and LB_FUZZ_CASES widen a local run (the
suite runs the defaults).  Each case is one client connection (tests/fuzz_http.py
builds it), answered by a raw backend that keeps the exact bytes it received
and parses them with h11 (tests/fuzz_backend.py).  The oracles:

1. no worker dies or restarts, and no worker logs an unhandled exception;
2. framing preserved: every request the backend parsed (strictly, with h11) is
   one the client sent validly, in order, with the same method, target and
   body, and carries no look-alike or hop-by-hop framing field; the backend
   never sees a request the client did not send, nor bytes it cannot parse;
3. every client connection gets, within a bound, complete well-formed
   responses (h11 as the client), each answering its own request, and/or a
   close; never a hang past lb's (short) timeouts;
4. nothing leaks to a later client: after every case a canary pair on a new
   connection gets exactly its own two answers, and the backend receives them
   whole, on connections that carry nothing else of an earlier case.
"""

from __future__ import annotations

import os
import random
import re
import select
import socket
import time
from dataclasses import dataclass, field

import h11
import pytest

from tests.conftest import LBProc, get
from tests.fuzz_backend import BROKEN_KINDS, EARLY_KINDS, FuzzBackend, echo_token
from tests.fuzz_http import Case, Reference, make_case, reference

SEED = int(os.environ.get("LB_FUZZ_SEED", "20261130"))
CASES = int(os.environ.get("LB_FUZZ_CASES", "400"))
ONLY = {int(x) for x in os.environ.get("LB_FUZZ_ONLY", "").split(",") if x}  # re-run these cases
BUDGET = float(os.environ.get("LB_FUZZ_BUDGET", "18"))  # seconds per parse path: stop early past it

LB_TIMEOUT = 0.5  # lb's client and upstream timeouts for this test
HANG = 4.0  # no answer nor close this long after the last byte: lb hangs
GRACE = 0.1  # how long a connection ending mid-request is given before the client half-closes

LB_CONFIG = f"""
[timeouts]
client_header = {LB_TIMEOUT}
client_body = {LB_TIMEOUT}
keepalive = 1
send = 2
upstream_connect = 1
upstream_response = {LB_TIMEOUT}
[outlier]
consecutive_failures = 0
[balancer]
slow_start = 0
"""

# Classes of input with a known open defect, kept out of the main run only
# while each has its own strict xfail test below (see `open_class`).
OPEN_CLASSES: frozenset = frozenset()


def open_class(ref: Reference) -> str | None:
    """The known-open class a case belongs to, if any."""
    body_before = False
    for r in ref.requests:
        names = {k.lower() for k, _ in r.headers}
        if r.upgrade and names & {b"content-length", b"transfer-encoding"}:
            return "upgrade_with_body"
        if r.upgrade and body_before:
            return "body_then_upgrade"
        body_before = body_before or bool(names & {b"content-length", b"transfer-encoding"})
    return None


FRAMING = {"content-length", "transfer-encoding"}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}
IDEMPOTENT = {b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"}
NO_ANSWER = {"close_no_answer", "reset"}
HOST_RE = re.compile(rb"^(?:[A-Za-z0-9._~!$&'()*+,;=%-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?$")


def fold(name: bytes) -> str:
    """A header name as a lenient backend (CGI, some frameworks) reads it."""
    return re.sub(r"-+", "-", name.decode("latin-1").lower().replace("_", "-")).strip("-")


# -- the client side ---------------------------------------------------------------------


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


# -- the oracles -----------------------------------------------------------------------


def check_answers(case: Case, ref: Reference, out: Outcome, got: list) -> list[str]:
    """What the client got; `got` is what the backend received meanwhile."""
    rd = out.reader
    bad = []
    if rd.error:
        bad.append(rd.error)
    if out.no_continue:
        bad.append(f"neither 100 Continue nor an answer {HANG} s after a valid Expect: 100-continue head")
    if out.hung:
        bad.append(f"no answer nor close {HANG} s after the request (lb timeouts are {LB_TIMEOUT} s)")
    finals = rd.finals
    if len(finals) > len(ref.requests) + 1:
        bad.append(f"{len(finals)} responses to {len(ref.requests)} requests")
    for i, ans in enumerate(finals):
        rq = ref.requests[i] if i < len(ref.requests) else None
        echo = ans.header(b"x-echo")
        kind = planned(case, rq)
        if echo is not None:
            early = rq is not None and not rq.invalid and kind in EARLY_KINDS  # answered before the body
            if rq is None or (rq not in ref.valid_prefix and not early):
                bad.append(f"response {i} came from the backend (X-Echo {echo!r}) for a request the client "
                           f"did not send validly")
                continue
            want = {echo_token(t, rq.body).encode() for t in _targets(rq.target)}
            others = {echo_token(t, r.body).encode() for r in ref.requests if r is not rq
                      for t in _targets(r.target)} | {b"unsolicited"}
            if echo in others - want or (echo not in want and kind not in BROKEN_KINDS):
                bad.append(f"response {i} answers another request: X-Echo {echo!r}, expected {want}")
            if kind in BROKEN_KINDS:
                continue  # the backend broke this answer itself (a close may end its body early)
            if ans.complete and ans.status == 200 and rq.method != b"HEAD" and ans.body != b"echo " + echo + b"\n":
                bad.append(f"response {i} body {ans.body[:80]!r} is not the backend's")
        elif kind in BROKEN_KINDS:
            continue
        elif ans.status < 400 and ans.status != 101:
            bad.append(f"response {i}: status {ans.status} without the backend's X-Echo")
        elif ans.status in (500, 502, 503, 504) and rq is not None and rq in ref.valid_prefix \
                and not any(planned(case, r) in BROKEN_KINDS for r in ref.requests[:i]):
            # (after a broken answer the backend may close a connection lb pooled:
            # a request with a body sent on it in that instant gets a 502, as in nginx)
            whole = any(r.complete and r.method == rq.method and r.target in _targets(rq.target) for r in got)
            if ans.status != 504 or not whole:
                # A 504 after the backend got the request whole may be a slow
                # backend thread on a loaded machine; anything else is lb's doing.
                bad.append(f"response {i}: lb answered {ans.status} to a valid request the backend answers "
                           f"validly ({'it got the request whole' if whole else 'it never got the request whole'})")
    answered = [a for a in finals if a.header(b"x-echo") is not None]
    if (ref.end == "clean" and len(ref.valid_prefix) == len(ref.requests) and len(answered) == len(finals)
            and not any(planned(case, r) in BROKEN_KINDS for r in ref.requests)
            and len(finals) < len(ref.requests) and not out.hung):
        bad.append(f"{len(finals)} answers to {len(ref.requests)} valid requests, then the connection ended")
    if rd.cur is not None and rd.eof:
        i = len(rd.answers)
        rq = ref.requests[i] if i < len(ref.requests) else None
        kind = planned(case, rq)
        # lb's own error answer to a request the strict reading could not parse:
        # the client cannot know whether lb read it as HEAD (no body) or not.
        unknown = rq is None and rd.cur.header(b"server") == b"lb" and rd.cur.status >= 400
        if kind not in BROKEN_KINDS and not unknown:
            bad.append(f"response {i} truncated although the backend answered validly ({kind})")
    return bad


def planned(case: Case, rq) -> str:
    """The backend's response kind for a request of the reference."""
    if rq is None:
        return "ok"
    return next((case.kinds[t] for t in _targets(rq.target) if t in case.kinds), "ok")


def _targets(target: bytes) -> list[bytes]:
    """The target a request may reach the backend with (absolute-form may be rewritten)."""
    m = re.match(rb"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*(.*)$", target)
    return [target] if m is None else [target, m.group(1) or b"/"]


def check_forwarded(case: Case, ref: Reference, got: list) -> list[str]:
    """What the backend received during the case against what the client sent."""
    bad = []
    valid = ref.valid_prefix
    i = 0  # index in the reference
    prev = None
    for rec in got:
        if prev is not None and _same(prev, rec) and prev.kind in NO_ANSWER and rec.method in IDEMPOTENT \
                and not rec.body:
            prev = rec  # lb resent a bodyless idempotent request whose connection died unanswered
            continue
        if not rec.complete:
            if i < len(ref.requests) and rec.target in _targets(ref.requests[i].target) \
                    and rec.method == ref.requests[i].method:
                # The head (and maybe part of the body) of a request lb then gave up:
                # fine if that head was valid.
                want = ref.requests[i]
                if want.invalid:
                    bad.append(f"the head of request {i} reached the backend: {want.invalid}")
                bad += [f"request {i} (head): {e}" for e in check_fields(rec, want) if "body" not in e]
                prev = rec
                i += 1
                continue
            bad.append(f"incomplete request at the backend not matching request {i}: {rec.method!r} "
                       f"{rec.target!r}")
            continue
        if i >= len(valid):
            why = (ref.requests[i].invalid or "incomplete") if i < len(ref.requests) else \
                f"the client sent {len(ref.requests)} request(s) (reference ends: {ref.end} {ref.error})"
            bad.append(f"forwarded request {i} ({rec.method!r} {rec.target!r}, body {len(rec.body)} bytes) "
                       f"that must not reach a backend: {why}")
            prev = rec
            i += 1
            continue
        want = valid[i]
        if rec.method != want.method or rec.target not in _targets(want.target) or rec.body != want.body:
            bad.append(f"request {i} forwarded as {rec.method!r} {rec.target!r} body {rec.body[:60]!r}, "
                       f"sent as {want.method!r} {want.target!r} body {want.body[:60]!r}")
        bad += [f"request {i}: {e}" for e in check_fields(rec, want)]
        prev = rec
        i += 1
    return bad


def _case_of(target: bytes) -> int | None:
    m = re.match(rb"^(?:[a-z]+://[^/]*)?/fz/(\d+)/", target)
    return int(m.group(1)) if m else None


def _same_request(rec, want) -> bool:
    return rec.method == want.method and rec.target in _targets(want.target) and \
        (rec.body == want.body or not rec.complete)


def _same(a, b) -> bool:
    return a.method == b.method and a.target == b.target and a.body == b.body


# Fields lb sets or rewrites itself; every other field reaches the backend as the
# client sent it in that request, or not at all (hop-by-hop by the Connection field).
LB_FIELDS = {b"host", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-request-id",
             b"content-length", b"transfer-encoding", b"connection", b"upgrade"}


def end_to_end(headers: list) -> dict:
    out: dict = {}
    for k, v in headers:
        if k.lower() not in LB_FIELDS:
            out.setdefault(k.lower(), []).append(v.strip(b" \t"))
    return out


def check_fields(rec, want) -> list[str]:
    """The fields as the backend got them: no look-alike, framing or hop-by-hop
    field lb should not pass on, and the client's own fields of that request
    only (nothing of another request, such as its trailers), unchanged."""
    bad = []
    sent, forwarded = end_to_end(want.headers), end_to_end(rec.headers)
    for name, values in forwarded.items():
        if name not in sent:
            bad.append(f"field {name!r} forwarded, not sent with this request")
        elif values != sent[name]:
            bad.append(f"field {name!r} forwarded as {values!r}, sent as {sent[name]!r}")
    names = [k for k, _ in rec.headers]
    for k in names:
        f = fold(k)
        canonical = k.lower().decode("latin-1")
        if f in FRAMING | HOP_BY_HOP | {"host"} and canonical != f:
            bad.append(f"look-alike field {k!r} (reads as {f!r} to a lenient backend)")
    lower = [k.lower() for k in names]
    cl, te = lower.count(b"content-length"), lower.count(b"transfer-encoding")
    if cl + te > 1:
        bad.append(f"{cl} Content-Length and {te} Transfer-Encoding fields")
    if te and rec.values(b"transfer-encoding")[0].strip().lower() != b"chunked":
        bad.append(f"Transfer-Encoding {rec.values(b'transfer-encoding')!r}")
    if want.body and cl + te != 1:
        bad.append("body forwarded without one framing field")
    hop = sorted({k.decode() for k in lower} & HOP_BY_HOP - ({"connection", "upgrade"} if want.upgrade else set()))
    if hop:
        bad.append(f"hop-by-hop fields forwarded: {hop}")
    hosts = rec.values(b"host")
    if len(hosts) != 1:
        bad.append(f"{len(hosts)} Host fields")
    elif not HOST_RE.match(hosts[0]):
        bad.append(f"invalid Host {hosts[0]!r} forwarded")
    m = re.match(rb"^[a-zA-Z][a-zA-Z0-9+.-]*://([^/?#]*)", want.target)
    if m is not None and len(hosts) == 1 and hosts[0].lower() != m.group(1).lower():
        bad.append(f"absolute-form target {want.target!r} forwarded as {rec.target!r} with Host {hosts[0]!r}")
    if rec.version != b"1.1":
        bad.append(f"forwarded as HTTP/{rec.version.decode()}")
    return bad


def canary(port: int, backend: FuzzBackend, case_id: int) -> list[str]:
    """Two pipelined requests on a new connection get exactly their own answers."""
    targets = [b"/canary/%d/a" % case_id, b"/canary/%d/b" % case_id]
    data = (b"GET " + targets[0] + b" HTTP/1.1\r\nHost: fuzz.test\r\n\r\n"
            b"GET " + targets[1] + b" HTTP/1.1\r\nHost: fuzz.test\r\nConnection: close\r\n\r\n")
    s = socket.create_connection(("127.0.0.1", port), timeout=HANG)
    buf = b""
    try:
        s.sendall(data)
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    conn = h11.Connection(h11.CLIENT)
    answers = []
    bad = []
    try:
        for t in targets:
            conn.send(h11.Request(method=b"GET", target=t, headers=[(b"Host", b"x")]))
            conn.send(h11.EndOfMessage())
            if not answers:
                conn.receive_data(buf)
                conn.receive_data(b"")
            resp, body = None, b""
            while True:
                ev = conn.next_event()
                if isinstance(ev, h11.Response):
                    resp = ev
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, (h11.ConnectionClosed,)) or ev is h11.NEED_DATA:
                    raise h11.RemoteProtocolError("connection ended")
            answers.append((resp, body))
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
    except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
        bad.append(f"canary: {len(answers)} of 2 answers ({exc}); got {buf[:300]!r}")
    for t, (resp, body) in zip(targets, answers):
        token = echo_token(t, b"").encode()
        echo = dict(resp.headers).get(b"x-echo")
        if resp.status_code != 200 or echo != token or body != b"echo " + token + b"\n":
            bad.append(f"canary {t!r} got {resp.status_code} X-Echo {echo!r} body {body[:80]!r}")
    return bad


def check_canary_at_backend(backend: FuzzBackend, case_id: int, got: list) -> list[str]:
    bad = []
    for suffix in (b"a", b"b"):
        t = b"/canary/%d/%s" % (case_id, suffix)
        recs = [r for r in got if r.target == t]
        if len(recs) != 1 or not recs[0].complete or recs[0].body:
            bad.append(f"backend got canary {t!r} {len(recs)} times "
                       f"({[(r.complete, len(r.body)) for r in recs]})")
            continue
        log = backend.conns[recs[0].conn]
        before = log.requests[:log.requests.index(recs[0])]
        leftovers = [r for r in before if not r.complete]
        if leftovers:
            bad.append(f"canary {t!r} shared a backend connection with an unfinished request "
                       f"{leftovers[0].target!r}")
    return bad


# -- the run --------------------------------------------------------------------------


@dataclass
class Run:
    failures: list = field(default_factory=list)
    cases: int = 0
    mutated: int = 0
    forwarded: int = 0
    answered: int = 0
    waited: int = 0
    skipped: int = 0  # cases of a known-open class (OPEN_CLASSES)
    early: int = 0  # answers the backend sent before the request body
    continued: int = 0  # Expect: 100-continue bodies sent after lb's 100 Continue
    elapsed: float = 0.0


def fuzz(lb: LBProc, backend: FuzzBackend, seed: int, n_cases: int, budget: float,
         exclude: frozenset = OPEN_CLASSES) -> Run:
    rng = random.Random(seed)
    run = Run()
    t0 = time.monotonic()
    errors_seen = 0
    recent: dict = {}  # the last few cases, for requests that reach the backend late
    for case_id in range(n_cases):
        if time.monotonic() - t0 > budget:
            break
        case = make_case(rng, case_id, exclude)
        wait_for_lb = rng.random() < 0.05
        if ONLY and case_id not in ONLY:
            continue
        ref = reference(case.data)
        if open_class(ref) in exclude:
            run.skipped += 1
            continue
        with backend.lock:
            backend.plan.update(case.kinds)
            start = len(backend.requests)
        out = drive(lb.port, case, ref, wait_for_lb)
        bad = canary(lb.port, backend, case_id)
        with backend.lock:
            got = backend.requests[start:]
            conn_errors = [(c.id, c.error, bytes(c.data[-300:])) for c in backend.conns if c.error]
        canaries = [r for r in got if r.target.startswith(b"/canary/")]
        mine, late = [], []
        for r in got:
            if r.target.startswith(b"/canary/"):
                continue
            owner = _case_of(r.target)
            sent_now = any(r.target in _targets(w.target) for w in ref.requests)
            (late if owner in recent and not sent_now else mine).append(r)
        bad += check_answers(case, ref, out, mine)
        bad += check_forwarded(case, ref, mine)
        for r in late:  # forwarded for an earlier case, reached the backend after its check
            earlier_case, earlier_ref = recent[_case_of(r.target)]
            if not any(_same_request(r, want) for want in earlier_ref.valid_prefix):
                bad.append(f"late at the backend: {r.method!r} {r.target!r} ({len(r.body)} body bytes) is no "
                           f"request case {earlier_case.id} sent validly")
            bad += [f"late request {r.target!r}: {e}" for e in check_fields(r, earlier_ref.valid_prefix[0])
                    if earlier_ref.valid_prefix and r.complete]
        recent[case_id] = (case, ref)
        recent.pop(case_id - 8, None)
        bad += check_canary_at_backend(backend, case_id, canaries)
        for cid, err, tail in conn_errors[errors_seen:]:
            bad.append(f"the backend could not parse what lb sent on connection {cid}: {err}; last bytes {tail!r}")
        errors_seen = len(conn_errors)
        run.cases += 1
        run.mutated += bool(case.mutations)
        run.forwarded += sum(r.complete for r in mine)
        run.early += sum(r.answered for r in mine)
        run.continued += case.expect_wait and out.reader.interim > 0
        run.answered += sum(1 for a in out.reader.finals if a.header(b"x-echo") is not None)
        run.waited += wait_for_lb
        if bad:
            bad.append(f"client received {out.reader.raw[:400]!r}")
            bad.append(f"backend received {[(r.conn, r.method, r.target, r.complete, r.kind) for r in got]}")
            run.failures.append((case, ref, bad))
    run.elapsed = time.monotonic() - t0
    return run


def report(run: Run) -> str:
    lines = [f"{len(run.failures)} of {run.cases} cases failed (seed {SEED}):"]
    for case, ref, bad in run.failures[:12]:
        lines.append(case.repro())
        lines.append(f"  reference: {[(r.method, r.target, len(r.body), r.complete, r.invalid) for r in ref.requests]}"
                     f" end={ref.end} {ref.error}")
        lines += ["  - " + b for b in bad[:8]]
    return "\n".join(lines)


def worker_restarts(lb: LBProc, timeout: float = 5.0) -> float:
    """The supervisor's restart counter (in /metrics once its first status is out)."""
    deadline = time.monotonic() + timeout
    while True:
        _, _, body = get(lb.admin_port, "/metrics")
        m = re.search(rb"^lb_worker_restarts(?:_total)? (\S+)$", body, re.M)
        if m:
            return float(m.group(1))
        assert time.monotonic() < deadline, "lb_worker_restarts missing from /metrics"
        time.sleep(0.1)


def unhandled(lb: LBProc) -> list[str]:
    """stderr lines that are not lb's JSON events: tracebacks, asyncio's fatal errors."""
    return [ln for ln in lb.log.lines if ln and not ln.startswith("{")]


DATA_PATHS = {"c": {}, "python": {"LB_NO_FASTPATH": "1"}}


@pytest.fixture
def fuzz_backend():
    b = FuzzBackend(random.Random(SEED))
    yield b
    b.close()


@pytest.mark.parametrize("data_path", DATA_PATHS)
def test_fuzz(data_path, fuzz_backend, tmp_path):
    lb = LBProc(tmp_path, [fuzz_backend], extra=LB_CONFIG, env=DATA_PATHS[data_path])
    try:
        pids = lb.worker_pids()
        assert pids
        run = fuzz(lb, fuzz_backend, SEED, CASES, BUDGET)
        print(f"\n{data_path}: {run.cases} cases ({run.mutated} mutated) in {run.elapsed:.1f} s, "
              f"{run.forwarded} requests forwarded, {run.answered} backend answers relayed "
              f"({run.early} sent before the request body), "
              f"{run.waited} waited for lb's timeouts, {run.continued} bodies sent after 100 Continue, "
              f"{run.skipped} skipped as known-open")
        if not ONLY:
            assert run.cases >= min(CASES, 100), f"only {run.cases} cases ran in the budget"
            assert run.forwarded >= run.cases // 3, "too few requests reached the backend: the generator is off"
        assert not run.failures, report(run)
        # Oracle 1: the same workers served the whole run.
        assert lb.proc.poll() is None
        assert lb.worker_pids() == pids, f"workers changed: {pids} -> {lb.worker_pids()}"
        assert not lb.log.events("worker_died"), lb.log.events("worker_died")
        assert worker_restarts(lb) == 0
        assert not unhandled(lb), "\n".join(unhandled(lb)[:40])
    finally:
        lb.stop()


# -- defects the fuzz test found, each pinned by a small test --------------------------


@pytest.mark.parametrize("data_path", DATA_PATHS)
def test_content_length_forwarded_as_parsed(data_path, fuzz_backend, tmp_path):
    """lb reads a Content-Length with leading zeros as its decimal value, and must
    forward that value, not the digits as sent: a backend that caps the digits
    (h11: 20) answered 502 to `0000000000000000000005`, and one that reads a
    leading zero as octal would frame `010` as 8 bytes where lb sent 10."""
    lb = LBProc(tmp_path, [fuzz_backend], extra=LB_CONFIG, env=DATA_PATHS[data_path])
    try:
        for digits, body in ((b"010", b"0123456789"), (b"0000000000000000000005", b"hello"), (b"00", b"")):
            target = b"/cl/" + digits
            data = b"POST " + target + b" HTTP/1.1\r\nHost: fuzz.test\r\nContent-Length: " + digits + b"\r\n\r\n" + body
            with socket.create_connection(("127.0.0.1", lb.port), timeout=HANG) as s:
                s.sendall(data)
                conn = h11.Connection(h11.CLIENT)
                conn.send(h11.Request(method=b"POST", target=target, headers=[(b"Host", b"x")]))
                conn.send(h11.EndOfMessage())
                resp = None
                while resp is None:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(s.recv(65536))
                    elif isinstance(ev, h11.Response):
                        resp = ev
            assert resp.status_code == 200, (digits, resp)
            assert dict(resp.headers).get(b"x-echo") == echo_token(target, body).encode()
            rec = [r for r in fuzz_backend.requests if r.target == target][-1]
            assert rec.values(b"content-length") == [b"%d" % len(body)], rec.headers
            assert rec.body == body
    finally:
        lb.stop()


UPGRADE_WITH_BODY = {
    "chunked": b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "content_length": b"Content-Length: 5\r\n\r\nhello",
}


# An Upgrade request with a body: httptools skips the body of an upgrade request
# (its on_headers_complete returns 1), so lb answers 400 rather than forward a
# framing whose body would follow as tunnel bytes.
@pytest.mark.parametrize("framing", UPGRADE_WITH_BODY)
def test_upgrade_request_with_body(framing, fuzz_backend, tmp_path):
    lb = LBProc(tmp_path, [fuzz_backend], extra=LB_CONFIG)
    try:
        target = b"/upgrade-body/" + framing.encode()
        data = (b"GET " + target + b" HTTP/1.1\r\nHost: fuzz.test\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n" + UPGRADE_WITH_BODY[framing])
        with socket.create_connection(("127.0.0.1", lb.port), timeout=HANG) as s:
            s.sendall(data)
            first = s.recv(65536)
        recs = [r for r in fuzz_backend.requests if r.target == target]
        if first.startswith(b"HTTP/1.1 400 "):
            assert recs == [], "rejected, yet forwarded"
        else:
            assert len(recs) == 1 and recs[0].complete and recs[0].body == b"hello", \
                (first[:100], [(r.complete, r.body) for r in recs])
    finally:
        lb.stop()


# A request with a body, then an Upgrade request in the same read: the first
# request's body goes upstream before lb waits for the backend's 101.
def test_body_request_then_upgrade_in_one_read(fuzz_backend, tmp_path):
    lb = LBProc(tmp_path, [fuzz_backend], extra=LB_CONFIG)
    try:
        status, _, _ = get(lb.port, "/warm")  # leaves a pooled upstream connection
        assert status == 200
        fuzz_backend.plan[b"/then-upgrade"] = "switch"
        data = (b"POST /body-first HTTP/1.1\r\nHost: fuzz.test\r\nContent-Length: 1\r\n\r\nx"
                b"GET /then-upgrade HTTP/1.1\r\nHost: fuzz.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        with socket.create_connection(("127.0.0.1", lb.port), timeout=HANG) as s:
            s.sendall(data)
            rd = ResponseReader(reference(data))
            deadline = time.monotonic() + HANG
            while not rd.finals and time.monotonic() < deadline:
                rd.feed(s.recv(65536))
        first = rd.finals[0] if rd.finals else None
        assert first is not None and first.status == 200, (rd.raw[:200], rd.error)
        assert first.header(b"x-echo") == echo_token(b"/body-first", b"x").encode()
    finally:
        lb.stop()


HEAD_REJECTIONS = {
    # refused by lb's own rules once the head is complete (a look-alike framing field)
    "rule": b"HEAD /x HTTP/1.1\r\nHost: fuzz.test\r\nTransfer_Encoding: chunked\r\n\r\n",
    # the same, queued behind a pipelined GET still in flight
    "rule_behind_a_get": b"GET /first HTTP/1.1\r\nHost: fuzz.test\r\n\r\n"
                         b"HEAD /x HTTP/1.1\r\nHost: fuzz.test\r\nTransfer_Encoding: chunked\r\n\r\n",
    # refused by llhttp past the method: a target that is no origin-form, a field without a colon
    "bad_target": b"HEAD ;x HTTP/1.1\r\nHost: fuzz.test\r\n\r\n",
    "bad_field": b"HEAD /x HTTP/1.1\r\nHost: fuzz.test\r\nNo colon here\r\n\r\n",
}


@pytest.mark.parametrize("data_path", DATA_PATHS)
@pytest.mark.parametrize("case", HEAD_REJECTIONS)
def test_error_answer_to_head_has_no_body(case, data_path, fuzz_backend, tmp_path):
    """lb's own error answer to a HEAD request it rejects ends with its head
    (RFC 9112 6.3): it carried the error text as a body, which a client reads
    as the start of the next response."""
    lb = LBProc(tmp_path, [fuzz_backend], extra=LB_CONFIG, env=DATA_PATHS[data_path])
    try:
        data = HEAD_REJECTIONS[case]
        with socket.create_connection(("127.0.0.1", lb.port), timeout=HANG) as s:
            s.sendall(data)
            rd = ResponseReader(reference(data.replace(b";x", b"/x").replace(b"No colon here", b"No: colon")))
            while not rd.eof and not rd.error:
                rd.feed(s.recv(65536))
        assert rd.error == "", (rd.error, rd.raw)
        assert [a.status for a in rd.finals] == ([200, 400] if case == "rule_behind_a_get" else [400]), rd.raw
        assert rd.raw.endswith(b"\r\n\r\n"), f"a body after the head of an answer to HEAD: {rd.raw!r}"
    finally:
        lb.stop()


REJECTED_HEADS = {
    # The request line ends without a version llhttp can keep reading (HTTP/0.9).
    "http09": b"GET /next HTTP/0.9\r\nHost: fuz",
    # A request line already past limits.max_request_line before its end has arrived.
    "long_target": b"GET /" + b"a" * 9000,
}


@pytest.mark.parametrize("data_path", DATA_PATHS)
@pytest.mark.parametrize("second", REJECTED_HEADS)
def test_body_then_rejected_partial_head_in_one_read(second, data_path, fuzz_backend, tmp_path):
    """A request with a body, then, in the same read, the start of a head lb
    rejects before it is complete: the body must still go upstream (it was
    left in the exchange's pending pieces: 504 after upstream_response)."""
    lb = LBProc(tmp_path, [fuzz_backend], extra=LB_CONFIG, env=DATA_PATHS[data_path])
    try:
        status, _, _ = get(lb.port, "/warm")  # leaves a pooled upstream connection
        assert status == 200
        first = b"POST /body-first HTTP/1.1\r\nHost: fuzz.test\r\nContent-Length: 5\r\n\r\nhello"
        data = first + REJECTED_HEADS[second]
        with socket.create_connection(("127.0.0.1", lb.port), timeout=HANG) as s:
            s.sendall(data)
            rd = ResponseReader(reference(first))
            deadline = time.monotonic() + HANG
            while len(rd.finals) < 2 and not rd.eof and not rd.error and time.monotonic() < deadline:
                rd.feed(s.recv(65536))
        statuses = [a.status for a in rd.finals]
        assert statuses[:1] == [200], (statuses, rd.raw[:300])
        assert rd.finals[0].header(b"x-echo") == echo_token(b"/body-first", b"hello").encode()
        assert statuses[1:] in ([400], [414], [431]), statuses
    finally:
        lb.stop()
