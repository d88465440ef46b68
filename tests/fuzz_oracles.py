"""The oracles of the fuzz test (tests/process/test_fuzz.py): what the client got, what
the backend got, and the canary after every case, each checked against the
strict reading of what the client sent (tests/fuzz_reference.py).  Each returns a
list of what is wrong, empty when all is well."""

from __future__ import annotations

import re
import socket
import time

import h11

from tests.fuzz_backend import BROKEN_KINDS, EARLY_KINDS, FuzzBackend, echo_token
from tests.fuzz_client import HANG, LB_TIMEOUT, Outcome
from tests.fuzz_reference import Reference
from tests.fuzz_requests import Case

FRAMING = {"content-length", "transfer-encoding"}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}
IDEMPOTENT = {b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"}
NO_ANSWER = {"close_no_answer", "reset"}
HOST_RE = re.compile(rb"^(?:[A-Za-z0-9._~!$&'()*+,;=%-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?$")


def fold(name: bytes) -> str:
    """A header name as a lenient backend (CGI, some frameworks) reads it."""
    return re.sub(r"-+", "-", name.decode("latin-1").lower().replace("_", "-")).strip("-")


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
            want = {echo_token(t, rq.body).encode() for t in targets(rq.target)}
            others = {echo_token(t, r.body).encode() for r in ref.requests if r is not rq
                      for t in targets(r.target)} | {b"unsolicited"}
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
            whole = any(r.complete and r.method == rq.method and r.target in targets(rq.target) for r in got)
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
    return next((case.kinds[t] for t in targets(rq.target) if t in case.kinds), "ok")


def targets(target: bytes) -> list[bytes]:
    """The target a request may reach the backend with (absolute-form may be rewritten)."""
    m = re.match(rb"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*(.*)$", target)
    if m is None:
        return [target]
    rest = m.group(1)
    return [target, rest if rest[:1] == b"/" else b"/" + rest]  # "http://h?q" is "/?q" (RFC 3986 6.2.3)


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
            if i < len(ref.requests) and rec.target in targets(ref.requests[i].target) \
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
        if rec.method != want.method or rec.target not in targets(want.target) or rec.body != want.body:
            bad.append(f"request {i} forwarded as {rec.method!r} {rec.target!r} body {rec.body[:60]!r}, "
                       f"sent as {want.method!r} {want.target!r} body {want.body[:60]!r}")
        bad += [f"request {i}: {e}" for e in check_fields(rec, want)]
        prev = rec
        i += 1
    return bad


def case_of(target: bytes) -> int | None:
    m = re.match(rb"^(?:[a-z]+://[^/]*)?/fz/(\d+)/", target)
    return int(m.group(1)) if m else None


def same_request(rec, want) -> bool:
    return rec.method == want.method and rec.target in targets(want.target) and \
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
