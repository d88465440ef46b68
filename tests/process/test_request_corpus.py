"""Data-driven corpus of hostile, malformed and edge-case HTTP/1.1 requests.

Every file ``tests/corpus/NAME.http`` is one case.  It is sent as raw bytes
over a real socket to a real lb process that fronts a real backend process
(``tests/backend.py``, an independent h11 parser that records what it gets).

File format
-----------
Line 1 is the expectation::

    # expect STATUS [STATUS ...] [WORD ...]

``STATUS`` is a three-digit code, or several alternatives joined by ``|``
(``400|505``).  The alternative ``none`` (last STATUS only) means "the
connection may also be closed without that response".  One STATUS is given
per final response, in order, so pipelined cases list several
(``# expect 200 400 forwarded``).  Interim 1xx responses are skipped.

``WORD`` is one of:

``forwarded`` / ``forwarded=N``
    The backend receives exactly 1 (or N) complete requests.  Each one is
    checked: at most one framing header (exactly one if it has a body; never
    Content-Length and Transfer-Encoding together; Transfer-Encoding only as
    ``chunked``; Content-Length equal to the body size), no hop-by-hop
    header (Connection, Keep-Alive, Proxy-Connection, TE, Trailer,
    Upgrade), and the body size.  The first one must also carry the method
    and request-target of the first request line of the case.
    Without this word the backend must receive nothing at all.
``partial``
    For requests whose head is valid but whose body turns out malformed
    (bad chunked framing): the backend may have seen the head, but must
    never receive a complete request.  Replaces ``forwarded``.
``body=N``
    Body size each forwarded request must have at the backend (default 0).
``closed``
    lb must close the connection after the last response.  Implied when
    the last STATUS is 400 or above (a rejected request ends the
    connection).
``target=T`` / ``host=H``
    The first forwarded request must have request-target ``T`` (instead of
    the case's own) / exactly ``Host: H`` and ``X-Forwarded-Host: H``.
``config=NAME``
    Which lb configuration to run the case against (see ``CONFIGS``);
    default ``default``.

Further lines starting with ``#`` right after line 1 are comments.  The rest
of the file is the request.  Physical line breaks (LF or CRLF) in it are
ignored; everything else is taken literally, after which the escapes
``\\r``, ``\\n``, ``\\t``, ``\\xHH`` and ``\\\\`` are decoded.  So bare CR,
bare LF, NUL and non-ASCII bytes are all written explicitly, and the files
themselves stay plain printable ASCII.  A request that must begin with
``#`` writes it as ``\\x23``.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from dataclasses import dataclass, field

import pytest

from tests.conftest import BackendProc, LBProc, free_port
from tests.rawhttp import get
from tests.corpuscases import CASE_FILES, CONFIGS, Case, parse_case
from tests.tlsutil import CertAuthority, tls_section

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}

READ_TIMEOUT = 4.0  # per case: how long to wait for responses / the close
FENCE = "/__corpus_fence"  # target of the request that shows the backend has had everything

# -- case files ----------------------------------------------------------------


# -- reading responses -----------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Malformed(Exception):
    pass


def _parse_response(buf: bytes, eof: bool) -> tuple[Response, int] | None:
    """One response from the start of buf: (response, bytes used) or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if eof and buf:
            raise Malformed(f"truncated response head: {buf[:200]!r}")
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not re.fullmatch(r"\d{3}", parts[1]):
        raise Malformed(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise Malformed(f"bad response header line {line!r}")
        headers.append((name.strip().lower(), value.strip()))
    pos = end + 4
    hmap = dict(headers)
    if 100 <= status < 200 or status in (204, 304):
        return Response(status, headers, b""), pos
    if "chunked" in hmap.get("transfer-encoding", "").lower():
        body = b""
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";")[0].strip(), 16)
            pos = eol + 2
            if size == 0:
                if buf.startswith(b"\r\n", pos):
                    return Response(status, headers, body), pos + 2
                tend = buf.find(b"\r\n\r\n", pos)
                if tend < 0:
                    break
                return Response(status, headers, body), tend + 4
            if len(buf) < pos + size + 2:
                break
            body += buf[pos:pos + size]
            pos += size + 2
        if eof:
            raise Malformed("truncated chunked response body")
        return None
    if "content-length" in hmap:
        n = int(hmap["content-length"])
        if len(buf) < pos + n:
            if eof:
                raise Malformed("truncated response body")
            return None
        return Response(status, headers, buf[pos:pos + n]), pos + n
    if not eof:
        return None
    return Response(status, headers, buf[pos:]), len(buf)


@dataclass
class Outcome:
    responses: list[Response] = field(default_factory=list)
    leftover: bytes = b""
    eof: bool = False
    reset: bool = False
    error: str | None = None

    @property
    def finals(self) -> list[int]:
        return [r.status for r in self.responses if r.status >= 200]


def exchange(port: int, data: bytes, want: int, need_close: bool, timeout: float = READ_TIMEOUT,
             tls: ssl.SSLContext | None = None) -> Outcome:
    """Send data at once; read until `want` final responses (and the close if asked).
    With `tls`, over a TLS connection made with that context."""
    out = Outcome()
    buf = b""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname="localhost")
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # lb may reject and close before reading everything
        deadline = time.monotonic() + timeout
        while True:
            out.responses, used = [], 0
            try:
                while True:
                    got = _parse_response(buf[used:], out.eof)
                    if got is None:
                        break
                    out.responses.append(got[0])
                    used += got[1]
            except (Malformed, ValueError) as e:
                out.error = str(e)
                break
            out.leftover = buf[used:]
            if out.eof:
                break
            if len(out.finals) >= want and not need_close:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                out.reset = out.eof = True
                continue
            except ssl.SSLError:  # closed without close_notify: an end of stream all the same
                out.eof = True
                continue
            if chunk:
                buf += chunk
            else:
                out.eof = True
    finally:
        s.close()
    return out


# -- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_backend():
    b = BackendProc("corpus")
    yield b
    b.kill()


# Each case runs against lb with its C fast path (workers/_fastpath.c), without
# it (LB_NO_FASTPATH=1), and over its HTTPS listener (the C path on the
# decrypted bytes): all must hold every expectation.
DATA_PATHS = {"c": {}, "python": {"LB_NO_FASTPATH": "1"}, "tls": {}}


@pytest.fixture(scope="module")
def corpus_ca(tmp_path_factory):
    return CertAuthority(tmp_path_factory.mktemp("corpus-ca"))


@pytest.fixture(scope="module")
def corpus_lbs(corpus_backend, corpus_ca, tmp_path_factory):
    """lb processes by (config name, data path), started on first use and shared by all cases."""
    made: dict[tuple[str, str], LBProc] = {}

    def get(config: str, data_path: str = "c") -> LBProc:
        key = (config, data_path)
        if key not in made:
            extra, tls_port = CONFIGS[config], None
            if data_path == "tls":
                tls_port = free_port()
                extra += "\n" + tls_section(tls_port, [corpus_ca.issue("localhost")])
            made[key] = LBProc(tmp_path_factory.mktemp(f"lb-{config}-{data_path}"), [corpus_backend],
                               extra=extra, env=DATA_PATHS[data_path])
            made[key].tls_port = tls_port
        lb = made[key]
        assert lb.proc.poll() is None, f"lb ({config}) exited: {lb.log.lines[-20:]}"
        return lb

    yield get
    for lb in made.values():
        lb.stop()


# -- tests -----------------------------------------------------------------------


def test_corpus_files_are_well_formed():
    """Enough cases, all printable ASCII, every expect line parses."""
    assert len(CASE_FILES) >= 40
    allowed = set(range(0x20, 0x7F)) | {0x0A}
    for path in CASE_FILES:
        raw = path.read_bytes()
        bad = sorted(set(raw) - allowed)
        assert not bad, f"{path.name}: raw bytes {bad} must be written as escapes"
        parse_case(path)


def _check_forwarded(rec: dict, case: Case) -> None:
    headers = [(k.lower(), v) for k, v in rec["headers"]]
    names = [k for k, _ in headers]
    hop = sorted(set(names) & HOP_BY_HOP)
    assert not hop, f"hop-by-hop headers forwarded: {hop}"
    cl = [v for k, v in headers if k == "content-length"]
    te = [v for k, v in headers if k == "transfer-encoding"]
    assert len(cl) + len(te) <= 1, f"several framing headers forwarded: CL={cl} TE={te}"
    if case.body:
        assert len(cl) + len(te) == 1, "a body was forwarded without a framing header"
    if te:
        assert te[0].strip().lower() == "chunked", f"forwarded Transfer-Encoding: {te[0]!r}"
    if cl:
        assert cl[0].strip() == str(rec["body_size"]), f"forwarded Content-Length {cl[0]!r} != body"
    assert rec["body_size"] == case.body, f"body size {rec['body_size']} at the backend, expected {case.body}"


def after_fence(lb: LBProc, backend: BackendProc) -> list[dict]:
    """What the backend received for the case, once it has had anything lb sent for it.

    Proof by a positive event, not a pause: a request on a fresh connection,
    which lb (one worker) forwards after every byte it forwarded for the case.
    Its answer means the backend has parsed it, and with it, in the same
    event loop, whatever lb had written to the backend before."""
    status, _, _ = get(lb.port, FENCE)
    records = backend.requests()
    assert status == 200 and any(r["target"] == FENCE for r in records), \
        f"the fence request after the case was not forwarded whole ({status}): {records}"
    return [r for r in records if r["target"] != FENCE]


@pytest.mark.parametrize("data_path", DATA_PATHS)
@pytest.mark.parametrize("path", CASE_FILES, ids=[p.stem for p in CASE_FILES])
def test_corpus_case(path, data_path, corpus_backend, corpus_lbs, corpus_ca):
    case = parse_case(path)
    lb = corpus_lbs(case.config, data_path)
    corpus_backend.reset()

    if data_path == "tls":
        out = exchange(lb.tls_port, case.data, want=len(case.statuses), need_close=case.closed,
                       tls=corpus_ca.client_context())
    else:
        out = exchange(lb.port, case.data, want=len(case.statuses), need_close=case.closed)
    context = (f"\n{case.name}: {case.comment}\nrequest: {case.data[:600]!r}\n"
               f"responses: {[(r.status, r.body[:120]) for r in out.responses]}\n"
               f"eof={out.eof} reset={out.reset} leftover={out.leftover[:200]!r}")

    assert out.error is None, f"unparseable response: {out.error}{context}"
    finals = out.finals
    expected = case.statuses
    if "none" in expected[-1] and len(finals) == len(expected) - 1:
        expected = expected[:-1]
        assert out.eof, f"no response and connection not closed{context}"
    assert len(finals) == len(expected), f"expected {len(expected)} final responses{context}"
    for got, want in zip(finals, expected):
        assert str(got) in want, f"status {got}, expected {'|'.join(sorted(want))}{context}"
    if case.closed:
        assert out.eof, f"lb did not close the connection{context}"
        assert out.leftover == b"", f"bytes after the last response{context}"

    records = after_fence(lb, corpus_backend)
    seen = f"\nbackend saw: {records}"
    if case.partial:
        assert len(records) <= 1, f"more than one request reached the backend{context}{seen}"
        assert all("body_size" not in r for r in records), \
            f"the backend received a complete request{context}{seen}"
    elif case.forwarded:
        assert len(records) == case.forwarded, f"expected {case.forwarded} forwarded{context}{seen}"
        assert all("body_size" in r for r in records), f"incomplete request at the backend{context}{seen}"
        method, target = case.data.split(b"\r\n", 1)[0].split(b" ")[:2]
        assert records[0]["method"] == method.decode()
        assert records[0]["target"] == (case.target or target.decode())
        if case.host is not None:
            got = [(k.lower(), v) for k, v in records[0]["headers"] if k.lower() in ("host", "x-forwarded-host")]
            assert got == [("host", case.host), ("x-forwarded-host", case.host)], f"{got}{context}{seen}"
        if data_path == "tls":
            xfp = [v for k, v in records[0]["headers"] if k.lower() == "x-forwarded-proto"]
            assert xfp == ["https"], f"{xfp}{context}{seen}"
        for rec in records:
            try:
                _check_forwarded(rec, case)
            except AssertionError as e:
                raise AssertionError(f"{e}{context}{seen}") from None
    else:
        assert records == [], f"a rejected request reached the backend{context}{seen}"
