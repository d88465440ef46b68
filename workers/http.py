"""Precomputed HTTP bytes and header tables used on the hot path.

Nothing here allocates per request: status lines, header fragments and the
error responses are built once (error responses once a second, when the Date
changes).
"""

from __future__ import annotations

import email.utils
import http
import re
import time

CRLF = b"\r\n"
SEP = b": "
LAST_CHUNK = b"0\r\n\r\n"

# Status lines for every code Python knows; unknown codes are built on demand.
STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1")) for s in http.HTTPStatus
}


def status_line(code: int) -> bytes:
    line = STATUS_LINES.get(code)
    if line is None:
        line = STATUS_LINES[code] = b"HTTP/1.1 %d Unknown\r\n" % code
    return line


# Methods that RFC 9110 section 9.2.2 calls idempotent: safe to retry.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Request headers that get special treatment (lower-case name -> tag).
H_HOST = 1
H_CONTENT_LENGTH = 2
H_TRANSFER_ENCODING = 3
H_CONNECTION = 4
H_HOP = 5  # dropped: keep-alive, proxy-connection, te, trailer
H_UPGRADE = 6
H_EXPECT = 7
H_XFF = 8
H_XF_DROP = 9  # x-forwarded-proto / x-forwarded-host: we set them ourselves
H_REQUEST_ID = 10

REQUEST_SPECIAL: dict[bytes, int] = {
    b"host": H_HOST,
    b"content-length": H_CONTENT_LENGTH,
    b"transfer-encoding": H_TRANSFER_ENCODING,
    b"connection": H_CONNECTION,
    b"keep-alive": H_HOP,
    b"proxy-connection": H_HOP,
    b"te": H_HOP,
    b"trailer": H_HOP,
    b"upgrade": H_UPGRADE,
    b"expect": H_EXPECT,
    b"x-forwarded-for": H_XFF,
    b"x-forwarded-proto": H_XF_DROP,
    b"x-forwarded-host": H_XF_DROP,
    b"x-request-id": H_REQUEST_ID,
}

# A request field whose name is not one of the names above but folds to one
# (case, "_" for "-", runs of separators, separators at either end):
# `Transfer_Encoding`, `Content--Length`, `X_Forwarded_For`.  lb does not
# treat it as the real field, but a backend that folds "_" and "-" (CGI
# environments, several frameworks) would: a second framing header lb never
# checked (request smuggling), or a client address lb never set.  Such a
# request is rejected with 400, on both parse paths (the C scanner declines
# every name with "_" or a doubled, leading or trailing "-").  Stricter than
# nginx, which drops every name with "_" by default (`underscores_in_headers
# off`): dropping would hide the attempt and still forward the request, and an
# ordinary header with "_" (`X_Custom`) is forwarded unchanged here.
# Only names lb gives a rule are guarded: X-Real-IP or Forwarded, which lb
# neither sets nor checks, reach the backend as the client sent them under
# their own names already, so their look-alikes add nothing to spoof.
H_LOOKALIKE = 11
_SEPARATORS = re.compile(rb"[-_]+")


def folded_name(name: bytes) -> bytes:
    """`name` as a server that ignores case and folds "_" into "-" reads it."""
    return _SEPARATORS.sub(b"-", name.lower()).strip(b"-")


def request_name_tag(name: bytes) -> int:
    """The REQUEST_SPECIAL tag of a field name, H_LOOKALIKE for a look-alike of one, 0 otherwise."""
    lower = name.lower()
    tag = REQUEST_SPECIAL.get(lower)
    if tag is not None:
        return tag
    return H_LOOKALIKE if folded_name(lower) in REQUEST_SPECIAL else 0

# Response heads are forwarded as the bytes llhttp validated, minus these lines
# (hop-by-hop; Transfer-Encoding is re-emitted by us when we re-chunk).
HOP_BY_HOP_LINES = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade)"
    rb"[ \t]*:[^\r]*",
    re.IGNORECASE,
)
# Content-Length lines of a response head: never sent with a 204 (RFC 9110 8.6).
CONTENT_LENGTH_LINES = re.compile(rb"\r\ncontent-length[ \t]*:[^\r]*", re.IGNORECASE)
# Names of the hop-by-hop fields and of Content-Length in a lower-cased head,
# in order (one C-level pass tells both the framing and what to strip).
RESPONSE_FIELDS = re.compile(
    rb"\r\n(connection|content-length|keep-alive|proxy-connection|te|trailer|transfer-encoding"
    rb"|upgrade)[ \t]*:"
)
# What RESPONSE_FIELDS finds in most responses (nginx sends the first two).
FIELDS_CL_CONNECTION = [b"content-length", b"connection"]
FIELDS_CONNECTION_CL = [b"connection", b"content-length"]
FIELDS_CL = [b"content-length"]
# The usual Connection line, as it appears in a lower-cased head.
KEEP_ALIVE_LINE = b"\r\nconnection: keep-alive\r"
KEEP_ALIVE_LINE_LEN = len(KEEP_ALIVE_LINE) - 1  # without the "\r" that ends it
# ... and as the last line of a head (where nginx puts it): checked by slicing.
KEEP_ALIVE_TAIL = b"\r\nconnection: keep-alive\r\n\r\n"
KEEP_ALIVE_TAIL_LEN = len(KEEP_ALIVE_TAIL)
_CONNECTION_VALUES = re.compile(rb"\r\nconnection[ \t]*:[ \t]*([^\r]*)")
UPGRADE_VALUE = re.compile(rb"\r\nupgrade[ \t]*:[ \t]*([^\r]*?)[ \t]*\r", re.IGNORECASE)

# Connection tokens that name no header we still have to strip.
PLAIN_CONNECTION_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})

CONNECTION_CLOSE = b"Connection: close\r\n"
CONNECTION_KEEP_ALIVE = b"Connection: keep-alive\r\n"
CONNECTION_UPGRADE = b"Connection: upgrade\r\n"
TE_CHUNKED = b"Transfer-Encoding: chunked\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
REQUEST_TAIL_11 = b" HTTP/1.1\r\n"
XFP_HTTP = b"X-Forwarded-Proto: http\r\n"
XFP_HTTPS = b"X-Forwarded-Proto: https\r\n"


def redirect_host(head: bytes) -> bytes:
    """The host (port dropped) of a forwarded request head, for a redirect to https."""
    i = head.find(b"\r\nHost: ") + 8
    host = head[i:head.index(b"\r\n", i)]
    if host.startswith(b"["):
        return host[:host.index(b"]") + 1]
    return host.partition(b":")[0]


def redirect_target(head: bytes) -> bytes:
    """The request target of a forwarded head as origin-form (absolute-form reduced)."""
    target = head[head.index(b" ") + 1:head.index(b" HTTP/1.")]
    if not target.startswith(b"/"):
        scheme, sep, rest = target.partition(b"://")
        target = b"/" + rest.partition(b"/")[2] if sep else b"/"
    return target


def drop_connection_named(head: bytes, lhead: bytes) -> bytes:
    """Remove the response header lines that a Connection field names."""
    names = connection_tokens(_CONNECTION_VALUES.findall(lhead)) - PLAIN_CONNECTION_TOKENS
    if not names:
        return head
    alt = b"|".join(re.escape(n) for n in names)
    named = re.compile(rb"\r\n(?:" + alt + rb")[ \t]*:[^\r]*", re.IGNORECASE)
    return named.sub(b"", head)


def connection_tokens(values: list[bytes]) -> set[bytes]:
    tokens: set[bytes] = set()
    for v in values:
        for t in v.split(b","):
            t = t.strip().lower()
            if t:
                tokens.add(t)
    return tokens


class DateCache:
    """The Date header value, refreshed by the worker's one-second tick."""

    __slots__ = ("header", "_second", "_errors", "retry_after")

    def __init__(self) -> None:
        self.retry_after = b"Retry-After: 1\r\n"  # sent with 429 and 503
        self._second = -1
        self.header = b""
        self._errors: dict[tuple[int, bool], bytes] = {}
        self.tick()

    def tick(self) -> None:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self.header = b"Date: " + email.utils.formatdate(now, usegmt=True).encode() + CRLF
            self._errors.clear()

    def redirect(self, status: int, location: bytes, *, close: bool, head_only: bool) -> bytes:
        """A redirect (301/308) to `location`, with a short body."""
        body = b"" if head_only else b"Redirecting to " + location + b"\n"
        return b"".join((
            status_line(status), b"Server: lb\r\n", self.header, b"Location: ", location, CRLF,
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % (len(location) + 16),
            CONNECTION_CLOSE if close else b"", CRLF, body,
        ))

    def error(self, status: int, *, close: bool = True, head_only: bool = False) -> bytes:
        """A complete lb-generated error response."""
        key = (status, close)
        resp = self._errors.get(key)
        if resp is None:
            phrase = status_line(status)[13:-2]
            body = phrase + b"\n"
            extra = b""
            if status == 503 or status == 429:
                extra = self.retry_after
            resp = b"".join(
                (
                    status_line(status),
                    b"Server: lb\r\n",
                    self.header,
                    b"Content-Type: text/plain; charset=utf-8\r\n",
                    b"Content-Length: %d\r\n" % len(body),
                    extra,
                    CONNECTION_CLOSE if close else b"",
                    CRLF,
                    body,
                )
            )
            self._errors[key] = resp
        if head_only:
            return resp[: resp.index(b"\r\n\r\n") + 4]
        return resp


DATE = DateCache()
