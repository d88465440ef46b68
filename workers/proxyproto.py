"""The PROXY protocol (v1 text, v2 binary) on a listener: lb behind an L4 balancer.

With `proxy_protocol = true` on a listener (top level for the plain one,
`[tls]` for the HTTPS one), every connection must open with the header an L4
balancer (HAProxy `send-proxy`, an AWS NLB, ...) writes before the client's
bytes; the client address it carries replaces the peer's in X-Forwarded-For,
the rate limit and the access log.  `ProxyHeader` is the protocol that reads
it, then hands the connection to the listener's own protocol: directly, or
through uvloop's TLS protocol for the HTTPS listener (the header precedes the
TLS handshake on the wire).  A connection without a valid header within
`timeouts.client_header` is closed and counted (`proxy_errors`): nothing of it
is parsed as HTTP.  LOCAL (v2) and UNKNOWN (v1) headers, which balancers send
for their own health checks, keep the peer's address.
"""

from __future__ import annotations

import ipaddress

from lb.core.log import log
from workers.edge import start_tls

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # bytes, CRLF included (the specification's bound)
LOG_EVERY = 10.0  # seconds between two proxy_protocol_error lines


class BadHeader(ValueError):
    pass


def parse(buf: bytes) -> tuple[str | None, int] | None:
    """(the client's address, or None to keep the peer's; the header's length),
    or None while `buf` may still become a header.  Raises BadHeader."""
    if buf[:1] == b"\r":
        head = buf[:12]
        if not V2_SIGNATURE.startswith(head):
            raise BadHeader("not a PROXY protocol header")
        if len(buf) < 16:
            return None
        return _v2(buf)
    if len(buf) < 6:
        if not b"PROXY ".startswith(buf):
            raise BadHeader("not a PROXY protocol header")
        return None
    if not buf.startswith(b"PROXY "):
        raise BadHeader("not a PROXY protocol header")
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX:
            raise BadHeader("v1 header longer than 107 bytes")
        return None
    return _v1(buf[:end]), end + 2


def _v1(line: bytes) -> str | None:
    parts = line.split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return None
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise BadHeader("malformed v1 header")
    want = 4 if parts[1] == b"TCP4" else 6
    if b"%" in parts[2] or b"%" in parts[3]:  # a zone id is no client address (and any byte)
        raise BadHeader("bad address in v1 header")
    try:
        src = ipaddress.ip_address(parts[2].decode("ascii"))
        dst = ipaddress.ip_address(parts[3].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise BadHeader("bad address in v1 header") from None
    if src.version != want or dst.version != want:
        raise BadHeader("address family does not match in v1 header")
    if src.version == 6 and src.ipv4_mapped:
        return str(src.ipv4_mapped)
    for port in parts[4:]:
        if not port.isdigit() or (len(port) > 1 and port[:1] == b"0") or int(port) > 65535:
            raise BadHeader("bad port in v1 header")
    return str(src)


def _v2(buf: bytes) -> tuple[str | None, int] | None:
    if buf[:12] != V2_SIGNATURE:
        raise BadHeader("not a PROXY protocol header")
    ver_cmd, family = buf[12], buf[13]
    length = int.from_bytes(buf[14:16], "big")
    if ver_cmd >> 4 != 2:
        raise BadHeader("unknown PROXY protocol version")
    if len(buf) < 16 + length:
        return None
    body = buf[16:16 + length]
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection
        return None, 16 + length
    if command != 1:
        raise BadHeader("unknown v2 command")
    if family == 0x11:  # TCP over IPv4
        if length < 12:
            raise BadHeader("v2 header too short for IPv4")
        return str(ipaddress.IPv4Address(body[:4])), 16 + length
    if family == 0x21:  # TCP over IPv6
        if length < 36:
            raise BadHeader("v2 header too short for IPv6")
        addr = ipaddress.IPv6Address(body[:16])
        return str(addr.ipv4_mapped or addr), 16 + length
    return None, 16 + length  # UNSPEC, UDP, unix sockets: nothing to use


class ProxyHeader:
    """The protocol of a new connection until its PROXY header is read."""

    __slots__ = ("worker", "make", "tls", "transport", "buf", "timer")

    def __init__(self, worker, make, tls=None) -> None:
        self.worker = worker
        self.make = make  # () -> the listener's protocol (a Downstream)
        self.tls = tls  # (SSLContext, handshake timeout) for the HTTPS listener
        self.transport = None
        self.buf = b""
        self.timer = None

    def connection_made(self, transport) -> None:
        w = self.worker
        self.transport = transport
        self.timer = w.loop.call_later(w.t_client_header, self._expired)
        w.pending.add(transport)  # counted by the cap and awaited by a drain until handed over
        w.listener.accepted()

    def data_received(self, data: bytes) -> None:
        buf = self.buf = self.buf + data
        try:
            got = parse(buf)
        except BadHeader as exc:
            self._reject(str(exc))
            return
        if got is None:
            return
        addr, n = got
        self.timer.cancel()
        self.buf = b""
        proto = self.make()
        if addr is not None:
            proto.client_ip = addr.encode()  # kept by its connection_made
        self._hand_over(proto, buf[n:])

    def _hand_over(self, proto, rest: bytes) -> None:
        t = self.transport
        w = self.worker
        if self.tls is None:
            t.set_protocol(proto)
            proto.connection_made(t)
            w.pending.discard(t)
            if rest:
                proto.data_received(rest)
            return
        ctx, timeout = self.tls
        start_tls(w, t, proto, ctx, timeout, rest)  # pending until the handshake ends

    def eof_received(self):
        return None  # closes

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.worker.pending_gone(self.transport)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def _expired(self) -> None:
        self._reject("no PROXY protocol header in time")

    def _reject(self, reason: str) -> None:
        w = self.worker
        w.proxy_errors += 1
        if w.proxy_error_log.due():
            peer = self.transport.get_extra_info("peername")
            log("proxy_protocol_error", slot=w.slot, peer=peer[0] if peer else None, error=reason,
                count=w.proxy_errors)
        self.timer.cancel()
        self.transport.abort()
