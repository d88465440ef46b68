"""A small HTTP/1.1 server on asyncio streams for the admin plane.

Not the hot path, but strict: Content-Length on every response but event
streams, keep-alive (HTTP/1.1 default, HTTP/1.0 on request), requests read
one at a time (pipelined ones are answered in order), bodies only with
Content-Length (411 otherwise; one header, ASCII digits, else 400), one Host,
limits on the head (431) and body (413), `Expect: 100-continue`, HEAD,
404/405 with an Allow header, an optional Host check (421, see hosts.py), and
every error as a JSON body.  A handler bug is logged and answered with 500 on
that request only.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from lb.core import log

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
HEAD_TIMEOUT = 10.0  # first byte of a request head -> its end
IDLE_TIMEOUT = 60.0  # keep-alive connection between requests
BODY_TIMEOUT = 10.0
LINGER_TIME = 2.0  # seconds an erroring connection keeps reading before it closes
LINGER_BYTES = 8 * 1024 * 1024

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_LENGTH = re.compile(r"^[0-9]{1,15}$")  # ASCII digits only: str.isdigit() also takes '\xb2'
_TARGET = re.compile(r"^/[\x21-\x7e]*$")


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    version: str
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> object:
        """The body as JSON; raises HTTPError(400) when it is not."""
        if not self.body:
            raise HTTPError(400, "expected a JSON body")
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"invalid JSON: {exc}") from None
        except RecursionError:
            raise HTTPError(400, "invalid JSON: nested too deeply") from None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    # An event stream: the body is what the iterator yields, until the client
    # goes away; the connection closes afterwards.
    stream: AsyncIterator[bytes] | None = None


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


def to_json(obj: object) -> str:
    """Strict JSON (browsers reject NaN): non-finite numbers become null."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False, default=str)


def _finite(obj: object) -> object:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_response(obj: object, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    body = to_json(obj).encode() + b"\n"
    return Response(status, body, "application/json", headers or [])


def error_response(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return json_response({"error": message, "status": status}, status, headers)


Handler = Callable[..., Awaitable[Response]]


class Router:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern, Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """`pattern` is a path where `{name}` matches one path segment."""
        rx = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
        self.routes.append((method, rx, handler))

    async def dispatch(self, req: Request) -> Response:
        allowed: list[str] = []
        method = "GET" if req.method == "HEAD" else req.method
        for m, rx, handler in self.routes:
            match = rx.match(req.path)
            if not match:
                continue
            if m != method:
                allowed.append(m)
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            return await handler(req, **params)
        if allowed:
            allow = ", ".join(sorted(set(allowed) | ({"HEAD"} if "GET" in allowed else set())))
            return error_response(405, f"method {req.method} not allowed on {req.path}; allowed: {allow}",
                                  [("Allow", allow)])
        return error_response(404, f"no such endpoint: {req.path}")


class Server:
    def __init__(self, router: Router, sock: socket.socket,
                 host_ok: Callable[[str | None], bool] | None = None) -> None:
        self.router = router
        self.sock = sock
        self.host_ok = host_ok  # Host header check (lb.admin.hosts); None = any Host
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._connection, sock=self.sock, limit=MAX_HEAD)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.connections):
            w.close()
        self.connections.clear()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.add(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            # Shutdown cancels open connections; ending normally keeps asyncio's
            # stream callback from printing a traceback for each one.
            pass
        finally:
            self.connections.discard(writer)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while True:
            timeout = HEAD_TIMEOUT if first else IDLE_TIMEOUT
            first = False
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            except asyncio.LimitOverrunError:
                await self._write(writer, error_response(431, f"request head larger than {MAX_HEAD} bytes"),
                                  keep_alive=False, head_only=False)
                return
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    await self._write(writer, error_response(400, "incomplete request head"),
                                      keep_alive=False, head_only=False)
                return
            try:
                req, keep_alive = self._parse(head)
                if self.host_ok is not None and not self.host_ok(req.headers.get("host")):
                    raise HTTPError(421, f"this admin server does not answer for Host "
                                         f"{req.headers['host'][:100]!r}; use its address, localhost, "
                                         f"or add the name to [admin] allowed_hosts")
                await self._read_body(req, reader, writer)
            except HTTPError as exc:
                # an answer to HEAD has no body, even an error (RFC 9112 6.3)
                await self._write(writer, error_response(exc.status, exc.message, exc.headers),
                                  keep_alive=False, head_only=head.startswith(b"HEAD "))
                await self._linger(reader, writer)
                return
            try:
                resp = await self.router.dispatch(req)
            except HTTPError as exc:
                resp = error_response(exc.status, exc.message, exc.headers)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a handler bug fails this request only
                log.log("admin_handler_error", path=req.path, error=repr(exc))
                resp = error_response(500, "internal error (logged)")
            if resp.stream is not None:
                await self._write_stream(writer, resp, req.method == "HEAD")
                return
            await self._write(writer, resp, keep_alive=keep_alive, head_only=req.method == "HEAD")
            if not keep_alive:
                return

    def _parse(self, head: bytes) -> tuple[Request, bool]:
        try:
            text = head[:-4].decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
            raise HTTPError(400, "undecodable request head") from None
        if "\r" in text.replace("\r\n", "") or "\x00" in text:
            raise HTTPError(400, "bare CR or NUL in the request head")
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise HTTPError(400, "malformed request line")
        method, target, version = parts
        if not _TOKEN.match(method):
            raise HTTPError(400, "malformed method")
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HTTPError(505 if version.startswith("HTTP/") else 400, f"unsupported version {version!r}")
        if not _TARGET.match(target):
            raise HTTPError(400, "request target must be an origin-form path")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not _TOKEN.match(name):
                raise HTTPError(400, f"malformed header line {line[:40]!r}")
            name = name.lower()
            value = value.strip(" \t")
            if name in headers:
                if name in ("content-length", "host"):
                    raise HTTPError(400, f"more than one {name} header")
                if name == "authorization":
                    if headers[name] != value:
                        raise HTTPError(400, f"conflicting {name} headers")
                    continue
                headers[name] = headers[name] + ", " + value
            else:
                headers[name] = value
        if version == "HTTP/1.1" and "host" not in headers:
            raise HTTPError(400, "missing Host header")
        split = urlsplit(target)
        req = Request(method, target, split.path, parse_qs(split.query), version, headers)
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
        return req, keep_alive

    async def _read_body(self, req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if "transfer-encoding" in req.headers:
            raise HTTPError(411, "request bodies need a Content-Length (Transfer-Encoding is not accepted)")
        cl = req.headers.get("content-length")
        if cl is None:
            return
        if not _LENGTH.match(cl):
            if cl.isascii() and cl.isdigit():
                raise HTTPError(413, f"request body larger than {MAX_BODY} bytes")
            raise HTTPError(400, f"invalid Content-Length {cl[:40]!r}: expected one decimal number")
        n = int(cl)
        if n > MAX_BODY:
            raise HTTPError(413, f"request body larger than {MAX_BODY} bytes")
        if n == 0:
            return
        if req.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        req.body = await asyncio.wait_for(reader.readexactly(n), BODY_TIMEOUT)

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an error answer, read and drop what the client is still sending
        (for a while) so that it gets to read the answer instead of a reset."""
        try:
            if writer.can_write_eof():
                writer.write_eof()
            deadline = asyncio.get_running_loop().time() + LINGER_TIME
            dropped = 0
            while dropped < LINGER_BYTES:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return
                chunk = await asyncio.wait_for(reader.read(65536), left)
                if not chunk:
                    return
                dropped += len(chunk)
        except (OSError, asyncio.TimeoutError):
            pass

    @staticmethod
    def _head(resp: Response, extra: list[tuple[str, str]]) -> bytes:
        try:
            reason = HTTPStatus(resp.status).phrase
        except ValueError:
            reason = "Status"
        lines = [f"HTTP/1.1 {resp.status} {reason}", f"Date: {formatdate(usegmt=True)}",
                 "Server: lb-admin", f"Content-Type: {resp.content_type}"]
        lines += [f"{k}: {v}" for k, v in resp.headers + extra]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _write(self, writer: asyncio.StreamWriter, resp: Response, *, keep_alive: bool,
                     head_only: bool) -> None:
        extra = [("Content-Length", str(len(resp.body)))]
        if not keep_alive:
            extra.append(("Connection", "close"))
        writer.write(self._head(resp, extra) + (b"" if head_only else resp.body))
        await writer.drain()

    async def _write_stream(self, writer: asyncio.StreamWriter, resp: Response, head_only: bool) -> None:
        extra = [("Cache-Control", "no-cache"), ("Connection", "close"), ("X-Accel-Buffering", "no")]
        writer.write(self._head(resp, extra))
        await writer.drain()
        if head_only or resp.stream is None:
            return
        try:
            async for chunk in resp.stream:
                writer.write(chunk)
                await writer.drain()
        finally:
            aclose = getattr(resp.stream, "aclose", None)
            if aclose is not None:
                await aclose()
