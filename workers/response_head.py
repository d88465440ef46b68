"""The rules a response head passes before it is relayed to the client.

The head comes whole from bytes llhttp validated (no Python callback per
field): the hop-by-hop lines go, and the lines a Connection field names
(RFC 9110 7.6.1); the status line says HTTP/1.1.  Then `framing` decides how
the body is relayed: as it comes (Content-Length, or close-delimited to an
HTTP/1.0 client), re-chunked, or none (HEAD, 204, 304), and whether the
client connection stays open.  The C scanner (workers/_fastpath.c) takes the
common response (HTTP/1.1, Content-Length, to a keep-alive HTTP/1.1 client)
and relays the same bytes; tests/unit/test_fastpath.py compares the two.
"""

from __future__ import annotations

import re

from httptools import HttpParserError

from workers.http import (
    CONNECTION_CLOSE,
    CONNECTION_KEEP_ALIVE,
    CONNECTION_UPGRADE,
    CONTENT_LENGTH_LINES,
    CRLF,
    FIELDS_CL,
    FIELDS_CL_CONNECTION,
    FIELDS_CONNECTION_CL,
    HOP_BY_HOP_LINES,
    KEEP_ALIVE_LINE,
    KEEP_ALIVE_LINE_LEN,
    KEEP_ALIVE_TAIL,
    KEEP_ALIVE_TAIL_LEN,
    RESPONSE_FIELDS,
    TE_CHUNKED,
    UPGRADE_VALUE,
    drop_connection_named,
)

# How the response body is relayed to the client.
MODE_NONE = 0  # no body (HEAD, 204, 304)
MODE_RAW = 1  # bytes as they come (Content-Length, or close-delimited to HTTP/1.0)
MODE_CHUNK = 2  # re-chunked for an HTTP/1.1 client
MODE_UPGRADE = 3  # a 101 head: what follows it is tunnel bytes

class HeadTooLarge(Exception):
    """The response head (1xx ones included) is longer than `limits.max_response_head`."""


class BadStatusLine(Exception):
    """A control character in the status line (see CONTROL_IN_LINE)."""


NO_BODY = frozenset((204, 304))  # statuses whose responses never have a body
CRLF_CRLF = b"\r\n\r\n"

# The status line up to its first control character (HTAB aside), if it has
# one: llhttp lets any byte but CR and LF through in a reason phrase, and a
# NUL or ESC relayed there breaks the client's parser (RFC 9112 4).
CONTROL_IN_LINE = re.compile(rb"[^\r\n\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def relayed_head(head: bytes) -> tuple[bytes, bool, bool]:
    """(the head as relayed, has Content-Length, framed by Content-Length or
    Transfer-Encoding)."""
    lhead = head.lower()
    fields = RESPONSE_FIELDS.findall(lhead)
    if fields == FIELDS_CL_CONNECTION or fields == FIELDS_CONNECTION_CL:
        # What most servers send: Content-Length and one Connection line.
        cl = framed = True
        if lhead[-KEEP_ALIVE_TAIL_LEN:] == KEEP_ALIVE_TAIL:
            # The usual spelling, last (cheaper than a find): cut it out.
            out = head[:-KEEP_ALIVE_TAIL_LEN] + CRLF_CRLF
        else:
            i = lhead.find(KEEP_ALIVE_LINE)
            if i >= 0:  # spelled the usual way: cut it out
                out = head[:i] + head[i + KEEP_ALIVE_LINE_LEN:]
            else:
                out = strip_hop_by_hop(head, lhead, fields)
    elif fields == FIELDS_CL:
        cl = framed = True
        out = head
    else:
        cl = b"content-length" in fields
        framed = cl or b"transfer-encoding" in fields
        out = strip_hop_by_hop(head, lhead, fields) if fields else head
    if out[7] != 49 or out[5] != 49:  # not "HTTP/1.1" (bytes 5 and 7 are the digits)
        out = b"HTTP/1.1" + out[8:]
    return out, cl, framed


def strip_hop_by_hop(head: bytes, lhead: bytes, fields: list) -> bytes:
    """`head` without its hop-by-hop lines and the lines its Connection names."""
    if b"connection" in fields:
        head = drop_connection_named(head, lhead)
    return HOP_BY_HOP_LINES.sub(b"", head)


def upgrade_head(ex, head: bytes, out: bytes) -> bytes:
    """A 101 answer to `ex`: relayed with its Connection and Upgrade lines, if
    `ex` asked for an upgrade and the 101 names a protocol; otherwise the
    backend broke the protocol."""
    m = UPGRADE_VALUE.search(head)
    if not ex.upgrade or m is None:
        raise HttpParserError("unexpected 101")
    return out[:-2] + CONNECTION_UPGRADE + b"Upgrade: " + m.group(1) + CRLF + CRLF


def framing(ex, status: int, out: bytes, cl: bool, draining: bool) -> tuple[int, bytes]:
    """How the body of this (final, non-101) response to `ex` is relayed, and
    its head as sent; clears `ex.keep_alive` when the client connection ends
    after it."""
    # A response that starts before the request body ended closes the client
    # connection after it (the rest of that body is read and dropped meanwhile).
    keep = ex.keep_alive and ex.body_done and not draining and not ex.upgrade
    extra = b""
    if ex.method == b"HEAD" or status in NO_BODY:
        mode = MODE_NONE
        if status == 204 and cl:
            out = CONTENT_LENGTH_LINES.sub(b"", out)  # RFC 9110 8.6: none on a 204
    elif cl:
        mode = MODE_RAW
    elif ex.http10:
        mode = MODE_RAW  # close-delimited, as HTTP/1.0 has no chunked coding
        keep = False
    else:
        mode = MODE_CHUNK
        extra = TE_CHUNKED
    if not keep:
        ex.keep_alive = False
        extra += CONNECTION_CLOSE
    elif ex.http10:
        extra += CONNECTION_KEEP_ALIVE
    return mode, (out[:-2] + extra + CRLF if extra else out)
