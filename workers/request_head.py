"""The rules a request head must pass before anything of it is forwarded.

RFC 9112 framing (sections 6 and 7) and the limits: exactly one Host in
HTTP/1.1, and a valid one; no Transfer-Encoding but a lone "chunked" (and none
in HTTP/1.0); no field whose name folds to one of those with a rule
(`Transfer_Encoding`, see workers/http.py); an absolute-form target gives the
host and is forwarded in origin-form.  llhttp has already refused duplicate
or malformed Content-Length, CL with TE, bare CR, NUL, obs-fold and invalid
names.  A broken rule raises `Reject(status)` from inside the parser
callback, which stops llhttp at once.

The C scanner (workers/_fastpath.c) forwards the common requests it
recognises whole as the same bytes this module would; everything else comes
here from `Downstream.on_headers_complete`.
"""

from __future__ import annotations

import re

from workers.classes import CHUNKED
from workers.exchange import Exchange
from workers.http import (
    CONNECTION_UPGRADE,
    CRLF,
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_EXPECT,
    H_HOST,
    H_LOOKALIKE,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    H_REQUEST_ID,
    H_XFF,
    PLAIN_CONNECTION_TOKENS,
    REQUEST_TAIL_11,
    TE_CHUNKED,
    connection_tokens,
    request_name_tag,
)

HEAD_SLACK = 512  # room for the X-Forwarded-* lines we add, in the header size check
NAME_TAGS_MAX = 4096  # distinct header spellings remembered (bounded: names come from clients)
NAME_TAGS: dict[bytes, int] = {}  # header name as sent -> REQUEST_SPECIAL tag, 0 = ordinary


# RFC 9110 7.2: Host = uri-host [ ":" port ], uri-host from RFC 3986 3.2.2
# (an IP literal, or a reg-name: unreserved, pct-encoded, sub-delims).  An
# empty value, a space, "/", "@" (userinfo), or a port that is not 0-65535
# is a 400 (RFC 9112 3.2: "a Host header field with an invalid field value").
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})+)(?::([0-9]{1,5}))?"
)
# The absolute-form target (RFC 9112 3.2.2): scheme "://" authority, then the
# path and query (which may be empty).
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
_HTTP_SCHEMES = (b"http", b"https")


class Reject(Exception):
    """Raised from a parser callback: answer `status` and close the connection."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def name_tag(name: bytes) -> int:
    """Classify a header name once per spelling; later lookups skip the lower()."""
    tag = request_name_tag(name)
    if len(NAME_TAGS) < NAME_TAGS_MAX:
        NAME_TAGS[name] = tag
    return tag


def valid_host(value: bytes) -> bytes:
    """The Host value without the trailing whitespace llhttp leaves; Reject(400) if invalid."""
    host = value.rstrip(b" \t")
    m = _HOST.fullmatch(host)
    if m is None or (m.group(1) is not None and int(m.group(1)) > 65535):
        raise Reject(400)
    return host


def origin_form(url: bytes) -> tuple[bytes, bytes]:
    """An absolute-form target as (host, origin-form target); Reject(400) if it is not one.

    RFC 9112 3.2.2: a server takes the host from an absolute-form target and
    ignores Host.  The backend gets the origin-form target and that host as
    Host (and X-Forwarded-Host), so it never sees one host where lb routed
    and logged another.  Only http and https, and no userinfo (RFC 9110 4.2.4).
    """
    m = _ABSOLUTE.fullmatch(url)
    if m is None or m.group(1).lower() not in _HTTP_SCHEMES:
        raise Reject(400)
    host = valid_host(m.group(2))
    if host != m.group(2):
        raise Reject(400)  # whitespace is no part of an authority
    path = m.group(3)
    return host, path if path[:1] == b"/" else b"/" + path


def drop_named(headers: list, tokens: set) -> list:
    """Remove the request headers a Connection field names (hop-by-hop by declaration)."""
    kept = []
    for i in range(0, len(headers), 4):
        if headers[i].lower() not in tokens:
            kept += headers[i : i + 4]
    return kept


def build_exchange(conn, p, url: bytes, headers: list, specials: list, w) -> Exchange:
    """Apply every request-head rule; return the exchange to forward, or raise Reject."""
    method = p.get_method()
    host = cl = te = conn_values = upgrade = expect = xff = rid = None
    hosts = 0
    for tag, value in specials:
        if tag == H_LOOKALIKE:
            raise Reject(400)  # a name that folds to one with a rule (workers/http.py)
        if tag == H_HOST:
            hosts += 1
            host = value
        elif tag == H_CONTENT_LENGTH:
            cl = value
        elif tag == H_TRANSFER_ENCODING:
            te = value if te is None else te + b"," + value
        elif tag == H_CONNECTION:
            conn_values = [value] if conn_values is None else conn_values + [value]
        elif tag == H_UPGRADE:
            upgrade = value
        elif tag == H_EXPECT:
            expect = value
        elif tag == H_XFF:
            xff = value if xff is None else xff + b", " + value
        elif tag == H_REQUEST_ID:
            if rid is None:
                rid = value  # the first one is kept, the others dropped
    keep_alive = p.should_keep_alive()
    if keep_alive and conn_values is None:
        http10 = False  # only HTTP/1.1 keeps alive without a Connection header
    else:
        version = p.get_http_version()
        if version == "1.1":
            http10 = False
        elif version == "1.0":
            http10 = True
        else:
            raise Reject(505)
    if hosts != 1 and (hosts > 1 or not http10):
        raise Reject(400)  # RFC 9112 3.2: exactly one Host in HTTP/1.1
    if method == b"CONNECT":
        raise Reject(405)
    if url[:1] != b"/" and url != b"*":
        host, url = origin_form(url)
    elif host is not None:
        host = valid_host(host)
    if len(headers) + 4 * len(specials) > w.max_header_fields:
        raise Reject(431)
    if len(url) > w.max_request_line:
        raise Reject(414)

    parts = [method, b" ", url, REQUEST_TAIL_11]
    parts += headers
    if host is not None:
        parts += (b"Host: ", host, CRLF, b"X-Forwarded-Host: ", host, CRLF)
    else:  # HTTP/1.0 without Host, forwarded as HTTP/1.1, which requires one
        parts += (b"Host: ", w.listen_host, CRLF)
    # X-Request-Id before X-Forwarded-*: the order the C scanner uses
    # (workers/_fastpath.c), so one request is forwarded as the same bytes
    # whichever path takes it.
    if rid is None and w.request_id:
        rid = w.new_request_id()
    if rid is not None:
        parts += (b"X-Request-Id: ", rid, CRLF)
    if xff is None:
        parts.append(conn.xff_line)
    else:
        parts += (b"X-Forwarded-For: ", xff, b", ", conn.client_ip, CRLF)
    parts.append(conn.XFP)
    chunked = is_upgrade = expect_continue = False
    has_body = False
    if te is not None:
        # RFC 9112 6.1: no Transfer-Encoding in HTTP/1.0; we accept exactly "chunked".
        if http10 or te.strip().lower() != b"chunked":
            raise Reject(400)
        chunked = has_body = True
        parts.append(TE_CHUNKED)
    elif cl is not None:
        n = int(cl)
        if w.max_body_size and n > w.max_body_size:
            raise Reject(413)
        has_body = n > 0
        # The value lb frames the body by, not the digits as sent: leading zeros
        # ("010") read as octal or past a digit cap elsewhere would frame it apart.
        parts += (b"Content-Length: ", b"%d" % n, CRLF)
    if conn_values is not None:
        tokens = connection_tokens(conn_values)
        if not tokens <= PLAIN_CONNECTION_TOKENS:
            parts = parts[:4] + drop_named(headers, tokens) + parts[4 + len(headers):]
    if upgrade is not None and p.should_upgrade():
        is_upgrade = True
        parts += (CONNECTION_UPGRADE, b"Upgrade: ", upgrade, CRLF)
    if expect is not None:
        if expect.lower() != b"100-continue":
            raise Reject(417)
        expect_continue = has_body and not http10
    parts.append(CRLF)
    head = b"".join(parts)
    if len(head) - len(url) > w.max_header_size + HEAD_SLACK:
        raise Reject(431)
    ex = Exchange(conn, method, head)
    if rid is not None:
        ex.rid = rid
    if has_body or is_upgrade:
        ex.pending = [head]
        ex.body_done = False
        ex.has_body = has_body
        ex.chunked = chunked
        ex.upgrade = is_upgrade
        ex.expect_continue = expect_continue
        if has_body and not chunked:
            ex.content_length = int(cl)
    if not keep_alive:
        ex.keep_alive = ex.plain = False
    if http10:
        ex.http10 = True
        ex.plain = False
    if is_upgrade or method == b"HEAD":
        ex.plain = False
    if w.classify is not None:
        ex.cls = w.classify(method, url, CHUNKED if chunked else (int(cl) if cl is not None else 0))
    return ex
