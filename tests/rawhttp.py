"""Raw HTTP/1.1 on real sockets for tests: one-shot exchanges, a byte-exact
client with strict response framing, request builders, and a threaded raw TCP
server for backends that misbehave on purpose."""

from __future__ import annotations

import http.client
import socket
import threading
import time

# -- raw socket helpers --------------------------------------------------------


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0, until_close: bool = True) -> bytes:
    """Send raw bytes; return everything read until the server closes (or timeout)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not until_close:
                break
        return b"".join(chunks)
    finally:
        s.close()


def status_codes(raw: bytes) -> list[int]:
    """Status codes of the responses in a raw byte stream (heads only, naive)."""
    codes = []
    for line in raw.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and len(line) >= 12 and line[9:12].isdigit():
            codes.append(int(line[9:12]))
    return codes


def get(port: int, path: str = "/", method: str = "GET", body: bytes | None = None, headers=None,
        timeout: float = 10.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


# -- byte-exact HTTP/1.1 client (strict response framing) ---------------------


class RawResponse:
    def __init__(self, version: str, status: int, headers: list[tuple[str, str]], head: bytes) -> None:
        self.version = version
        self.status = status
        self.headers = headers  # (lower-case name, value), in order
        self.head = head
        self.body = b""

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def header(self, name: str) -> str | None:
        vs = self.values(name)
        assert len(vs) <= 1, f"{name} repeated: {vs}"
        return vs[0] if vs else None

    def connection_tokens(self) -> set[str]:
        return {t.strip().lower() for v in self.values("connection") for t in v.split(",") if t.strip()}


class RawConn:
    """A client socket that reads responses exactly as lb sent them, checking framing strictly."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()

    @classmethod
    def from_socket(cls, sock: socket.socket) -> "RawConn":
        c = cls.__new__(cls)
        c.sock = sock
        c.buf = bytearray()
        return c

    def __enter__(self) -> "RawConn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(262144)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed with {len(self.buf)} of {n} bytes")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                return self.read_exact(i + 2)[:-2]
            if not self._fill():
                raise EOFError("connection closed inside a line")

    def read_head(self) -> RawResponse:
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                break
            if not self._fill():
                raise EOFError(f"connection closed before a response head: {bytes(self.buf)!r}")
        head = self.read_exact(i + 4)
        lines = head[:-4].split(b"\r\n")
        status_line = lines[0].decode("latin-1")
        assert status_line.startswith("HTTP/1.") and status_line[12:13] in ("", " "), status_line
        version, code = status_line[5:8], int(status_line[9:12])
        headers = []
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            headers.append((name.lower(), value.strip()))
        return RawResponse(version, code, headers, head)

    def read_chunked(self) -> bytes:
        """A chunked body, strictly: hex size, CRLF, data, CRLF ... last chunk, trailers, CRLF."""
        parts = []
        while True:
            size_line = self._line()
            size_hex = size_line.split(b";", 1)[0].strip()
            assert size_hex and all(c in b"0123456789abcdefABCDEF" for c in size_hex), size_line
            size = int(size_hex, 16)
            if size == 0:
                while self._line():  # trailer fields, then the empty line
                    pass
                return b"".join(parts)
            parts.append(self.read_exact(size))
            assert self.read_exact(2) == b"\r\n", "chunk data not followed by CRLF"

    def read_until_close(self) -> bytes:
        while self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def read_body(self, resp: RawResponse, method: str = "GET") -> bytes:
        if method == "HEAD" or resp.status < 200 or resp.status in (204, 304):
            return b""
        te = resp.values("transfer-encoding")
        if te:
            assert [t.strip().lower() for t in te] == ["chunked"], te
            return self.read_chunked()
        cl = resp.values("content-length")
        if cl:
            assert len(cl) == 1, cl
            return self.read_exact(int(cl[0]))
        return self.read_until_close()

    def read_response(self, method: str = "GET") -> RawResponse:
        resp = self.read_head()
        resp.body = self.read_body(resp, method)
        return resp

    def request(self, method: str, target: str, headers: dict | None = None, body: bytes = b"",
                version: str = "1.1") -> RawResponse:
        self.send(build_request(method, target, headers, body, version))
        return self.read_response(method)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True if the peer closes (EOF or reset) within `timeout` with no further bytes."""
        if self.buf:
            return False
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(old)


def build_request(method: str, target: str, headers: dict | None = None, body: bytes = b"",
                  version: str = "1.1") -> bytes:
    hs = {"Host": "lb.test"} if version == "1.1" else {}
    hs.update(headers or {})
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in hs):
        hs["Content-Length"] = str(len(body))
    lines = [f"{method} {target} HTTP/{version}"] + [f"{k}: {v}" for k, v in hs.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk_body(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


def read_head(conn: socket.socket) -> bytes | None:
    """Read from `conn` until the end of a request head (what follows it in the
    same reads included); None if the peer closed first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    return buf


def request_heads(conn: socket.socket, stop=None):
    """The request heads a client sends on `conn`, one at a time (bodyless
    requests: what follows a head is the next one), until it closes or
    `stop()` says so before the next read."""
    buf = b""
    while stop is None or not stop():
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        yield head


class ThreadedServer:
    """A raw TCP server on 127.0.0.1 for backends that misbehave on purpose:
    subclasses implement `handle(conn)`, run on a thread per connection."""

    def __init__(self, backlog: int = 64) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.closing = threading.Event()  # set by close(): handlers that hold a connection wait on it
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stopping(self) -> bool:
        return self.closing.is_set()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        self.closing.set()
        self.sock.close()
        self.thread.join(2)
