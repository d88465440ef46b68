"""Fuzz: mutated requests, sent in random splits, and broken backend responses,
through a real lb process on both parse paths (C fast path, LB_NO_FASTPATH=1).

Bounded and seeded: LB_FUZZ_SEED and LB_FUZZ_CASES widen a local run (the
suite runs the defaults; LB_FUZZ_BUDGET bounds each path's seconds and
LB_FUZZ_ONLY=3,17 replays cases of a seed; the run: tests/fuzz_run.py).  Each
case is one client connection (tests/fuzz_requests.py builds it,
tests/fuzz_reference.py reads its bytes strictly; the client is
tests/fuzz_client.py), answered by a raw backend that keeps the exact bytes
it received and parses them with h11 (tests/fuzz_backend.py).
The oracles (tests/fuzz_oracles.py, and the run below for the first):

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

import random
import re
import socket
import time

import h11
import pytest

from tests.conftest import LBProc
from tests.fuzz_backend import FuzzBackend, echo_token
from tests.fuzz_client import HANG, LB_TIMEOUT, ResponseReader
from tests.fuzz_reference import reference
from tests.fuzz_run import BUDGET, CASES, ONLY, SEED, fuzz, report
from tests.rawhttp import get

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


@pytest.mark.parametrize("data_path", DATA_PATHS)
def test_control_character_in_reason_phrase_is_not_relayed(data_path, fuzz_backend, tmp_path):
    """llhttp lets any byte but CR and LF through in a response's reason phrase;
    relayed as is, a NUL or ESC there breaks the client's parser (RFC 9112 4:
    reason-phrase is HTAB, SP, VCHAR, obs-text): lb answers 502 instead."""
    lb = LBProc(tmp_path, [fuzz_backend], extra=LB_CONFIG, env=DATA_PATHS[data_path])
    try:
        for i, method in enumerate((b"GET", b"HEAD", b"GET", b"GET")):
            target = b"/ctl-reason/%d" % i
            fuzz_backend.plan[target] = "ctl_reason"
            data = method + b" " + target + b" HTTP/1.1\r\nHost: fuzz.test\r\n\r\n"
            with socket.create_connection(("127.0.0.1", lb.port), timeout=HANG) as s:
                s.sendall(data)
                rd = ResponseReader(reference(data))
                deadline = time.monotonic() + HANG
                while not rd.finals and not rd.eof and not rd.error and time.monotonic() < deadline:
                    rd.feed(s.recv(65536))
            assert rd.error == "" and [a.status for a in rd.finals] == [502], (rd.error, rd.raw)
    finally:
        lb.stop()
