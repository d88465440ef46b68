"""What a strict parser makes of a fuzz case's bytes (tests/process/test_fuzz.py).

`reference()` parses the mutated bytes with h11 (strict and independent of
lb) plus the framing rules h11 leaves to the application (obs-fold, CL with
TE, lists of lengths): the requests a careful server would see, in order, and
how the bytes end (cleanly, mid-request, at an error, at an upgrade).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import h11

# -- the strict reading of the client's bytes --------------------------------------------


@dataclass
class RefRequest:
    method: bytes
    target: bytes
    headers: list
    head: bytes  # the raw head bytes as sent
    body: bytes = b""
    complete: bool = False
    invalid: str = ""  # why a careful proxy must not forward it ("" if fine)
    upgrade: bool = False


@dataclass
class Reference:
    requests: list = field(default_factory=list)
    end: str = "clean"  # clean | partial | error | close | upgrade
    error: str = ""
    tail: bytes = b""  # after an upgrade request: bytes for the tunnel

    @property
    def valid_prefix(self) -> list:
        """The complete requests before the first one that must not be forwarded."""
        out = []
        for r in self.requests:
            if not r.complete or r.invalid:
                break
            out.append(r)
        return out


def _consumed(conn: h11.Connection, fed: int) -> int:
    buf = getattr(conn, "_receive_buffer", None)
    return fed - len(buf) if buf is not None else fed


def _invalid(head: bytes, headers: list) -> str:
    """The framing rules h11 leaves to the application (RFC 9112 5.2, 6.1, 6.3)."""
    names = [k.lower() for k, _ in headers]
    if re.search(rb"\n[ \t]", head):
        return "obs-fold"
    if b"content-length" in names and b"transfer-encoding" in names:
        return "Content-Length with Transfer-Encoding"
    cls = [v for k, v in headers if k.lower() == b"content-length"]
    if len(cls) > 1 or any(not v.strip().isdigit() for v in cls):
        return "Content-Length list or repeated"
    tes = [v for k, v in headers if k.lower() == b"transfer-encoding"]
    if len(tes) > 1 or any(v.strip().lower() != b"chunked" for v in tes):
        return "Transfer-Encoding other than one chunked"
    return ""


_CL_ZEROS = re.compile(rb"(?im)^(content-length[ \t]*:[ \t]*)(0+)(?=[0-9])")


def _upgrade_token(headers: list) -> bool:
    return any(t.strip().lower() == b"upgrade" for k, v in headers if k.lower() == b"connection"
               for t in v.split(b","))


def reference(data: bytes) -> Reference:
    """What a careful server reads in `data`.  An Upgrade field without the
    "upgrade" connection option is no upgrade (RFC 9110 7.8): h11 would stop
    there, so it is read again with that field renamed."""
    # Leading zeros of a Content-Length are valid (1*DIGIT) but count against
    # h11's 20-digit cap: read them as the whitespace before the value instead.
    data = _CL_ZEROS.sub(lambda m: m.group(1) + b" " * len(m.group(2)), data)
    for _ in range(4):
        ref = _reference(data)
        last = ref.requests[-1] if ref.requests else None
        if ref.end != "upgrade" or last is None or _upgrade_token(last.headers) or last.method == b"CONNECT":
            return ref
        start = data.find(last.head)
        i = data.lower().find(b"\nupgrade:", start, start + len(last.head))
        if start < 0 or i < 0:
            return ref
        data = data[:i + 1] + b"X" + data[i + 2:]
    return ref


def _keeps_alive(req: h11.Request) -> bool:
    tokens = {t.strip().lower() for k, v in req.headers.raw_items() if k.lower() == b"connection"
              for t in v.split(b",")}
    if b"close" in tokens:
        return False
    return req.http_version == b"1.1" or (req.http_version == b"1.0" and b"keep-alive" in tokens)


def _reference(data: bytes) -> Reference:
    """One fresh h11 parser per request: h11 keeps no HTTP/1.0 connection alive
    and refuses the empty lines RFC 9112 2.2 lets a server skip before a
    request line (llhttp skips any CR and LF there; so does this reading)."""
    ref = Reference()
    pos = 0
    while True:
        while pos < len(data) and data[pos] in b"\r\n":
            pos += 1
        if pos == len(data):
            return ref
        # RFC 9112 3 lets a server split the request line on runs of SP (llhttp
        # does; lb then sends one SP): read it so, counting what was dropped.
        eol = data.find(b"\n", pos)
        line = data[pos:eol if eol >= 0 else len(data)]
        squeezed = re.sub(rb"  +", b" ", line)
        dropped = len(line) - len(squeezed)
        rest = squeezed + data[pos + len(line):]
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        fed = len(rest)
        conn.receive_data(rest)
        conn.receive_data(b"")  # the end of the bytes: what is left unparsed is a partial request
        req = ev_req = None
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as exc:
                msg = str(exc)
                if "closed connection" in msg or "unexpectedly closed" in msg:
                    ref.end = "partial"
                else:
                    ref.end, ref.error = "error", msg
                return ref
            if isinstance(ev, h11.Request):
                ev_req = ev
                headers = list(ev.headers.raw_items())
                head = data[pos:pos + _consumed(conn, fed) + dropped]
                req = RefRequest(ev.method, ev.target, headers, head, invalid=_invalid(head, headers))
                ref.requests.append(req)
                req.upgrade = any(k.lower() == b"upgrade" for k, _ in headers) and _upgrade_token(headers)
            elif isinstance(ev, h11.Data):
                req.body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                req.complete = True
                pos += _consumed(conn, fed) + dropped
                if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                    ref.end, ref.tail = "upgrade", data[pos:]
                    return ref
                if not _keeps_alive(ev_req):
                    ref.end = "close"
                    return ref
                break
            elif ev is h11.PAUSED:
                ref.end, ref.tail = "upgrade", data[pos:]
                return ref
            else:
                ref.end, ref.error = "error", f"unexpected {ev!r}"
                return ref
