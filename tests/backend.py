"""A scriptable HTTP/1.1 backend for the tests, run as its own process.

It parses with h11 (an independent, strict implementation), so anything lb
forwards is checked by a parser other than its own.  Every request it receives
is recorded; `GET /__requests` returns them as JSON and `POST /__reset` clears
them, `GET /__stats` counts connections (all answered directly, not through lb).

Routes (query string ignored unless noted):
  /echo            200, JSON of method, target, headers, body size
  /bytes/N         N bytes, Content-Length, streamed in 256 KiB pieces
  /chunked/N       N bytes, chunked
  /nolength/N      N bytes, no framing, connection closed after
  /status/N        status N, small body (none for 1xx/204/304)
  /slow/MS         answers after MS milliseconds
  /close           answers with Connection: close
  /reset           closes the socket with RST, no response
  /hang            reads the request, never answers
  /ws              101 Switching Protocols, then echoes raw bytes
  /drain           reads the body, answers with its size and SHA-256 prefix
  /sized/N         N bytes ("s"), Content-Length; a HEAD gets the same head, no body
  anything else    200, "backend NAME\n"
Run: python -m tests.backend --port P --name NAME [--keepalive-timeout S]
With --tls-cert/--tls-key it serves HTTPS (and with --tls-client-ca asks for a
client certificate from that CA, recording its subject as "client_cert").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import struct

import h11

PIECE = b"x" * (256 * 1024)


class State:
    def __init__(self, name: str, keepalive_timeout: float) -> None:
        self.name = name
        self.keepalive_timeout = keepalive_timeout
        self.requests: list[dict] = []
        self.connections = 0


async def send_body_bytes(writer, n: int, chunked: bool, conn: h11.Connection) -> None:
    left = n
    while left > 0:
        piece = PIECE if left >= len(PIECE) else PIECE[:left]
        left -= len(piece)
        writer.write(conn.send(h11.Data(data=piece)))
        await writer.drain()


def response(status: int, body: bytes = b"", headers=(), *, length=True) -> tuple[h11.Response, bytes]:
    hs = [(b"Server", b"test-backend")] + list(headers)
    if length and not (100 <= status < 200 or status in (204, 304)):
        hs.append((b"Content-Length", str(len(body)).encode()))
    return h11.Response(status_code=status, headers=hs), body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: State) -> None:
    state.connections += 1
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    sock = writer.get_extra_info("socket")
    try:
        while True:
            event = await next_event(reader, conn, state.keepalive_timeout)
            if event is None or isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return
            target = event.target.decode()
            path = target.split("?", 1)[0]
            headers = [(k.decode(), v.decode("latin-1")) for k, v in event.headers]
            record = {"method": event.method.decode(), "target": target, "headers": headers,
                      "http_version": event.http_version.decode()}
            peer = writer.get_extra_info("peercert")
            if peer:
                record["client_cert"] = dict(x[0] for x in peer["subject"])
            if path == "/__requests":
                body = json.dumps(state.requests).encode()
                await finish(reader, writer, conn, *response(200, body, [(b"Content-Type", b"application/json")]))
                continue
            if path == "/__stats":
                body = json.dumps({"connections": state.connections, "requests": len(state.requests)}).encode()
                await finish(reader, writer, conn, *response(200, body))
                continue
            if path == "/__reset":
                state.requests.clear()
                await finish(reader, writer, conn, *response(200, b"ok"))
                continue
            state.requests.append(record)
            parts = path.strip("/").split("/")
            head = parts[0]
            arg = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            if head == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if head == "hang":
                await asyncio.sleep(3600)
                return
            if head == "ws":
                writer.write(conn.send(h11.InformationalResponse(
                    status_code=101, headers=[(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")])))
                await writer.drain()
                data, _closed = conn.trailing_data
                if data:
                    writer.write(data)
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        return
                    writer.write(chunk)
                    await writer.drain()
            # Read the request body (counting and hashing, never storing it whole).
            size = 0
            digest = hashlib.sha256()
            while True:
                ev = await next_event(reader, conn, 60)
                if ev is None:
                    return
                if isinstance(ev, h11.Data):
                    size += len(ev.data)
                    digest.update(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    break
            record["body_size"] = size
            if head == "slow":
                await asyncio.sleep(arg / 1000)
            if head == "echo":
                record_body = json.dumps(record).encode()
                await finish(reader, writer, conn, *response(200, record_body, [(b"Content-Type", b"application/json")]))
            elif head == "drain":
                body = json.dumps({"size": size, "sha256": digest.hexdigest()}).encode()
                await finish(reader, writer, conn, *response(200, body))
            elif head == "bytes":
                writer.write(conn.send(response(200, b"", [(b"Content-Length", str(arg).encode())], length=False)[0]))
                await send_body_bytes(writer, arg, False, conn)
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
            elif head == "chunked":
                writer.write(conn.send(h11.Response(status_code=200, headers=[(b"Transfer-Encoding", b"chunked")])))
                await send_body_bytes(writer, arg, True, conn)
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
            elif head == "nolength":
                writer.write(b"HTTP/1.1 200 OK\r\nServer: test-backend\r\nConnection: close\r\n\r\n")
                left = arg
                while left > 0:
                    piece = PIECE[: min(left, len(PIECE))]
                    left -= len(piece)
                    writer.write(piece)
                    await writer.drain()
                writer.close()
                return
            elif head == "status":
                status = arg or 200
                body = b"" if (100 <= status < 200 or status in (204, 304)) else b"status %d\n" % status
                await finish(reader, writer, conn, *response(status, body))
            elif head == "close":
                await finish(reader, writer, conn, *response(200, b"closing\n", [(b"Connection", b"close")]))
            elif head == "hopbyhop":
                await finish(reader, writer, conn, *response(
                    200, b"hop\n", [(b"Connection", b"X-Secret, keep-alive"), (b"X-Secret", b"1"),
                                    (b"Keep-Alive", b"timeout=5"), (b"Proxy-Connection", b"keep-alive"),
                                    (b"X-Kept", b"yes")]))
            elif head == "sized":
                resp, body = response(200, b"s" * arg, [(b"Content-Type", b"text/plain")])
                if event.method == b"HEAD":
                    writer.write(conn.send(resp))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                else:
                    await finish(reader, writer, conn, resp, body)
            else:
                body = f"backend {state.name}\n".encode()
                await finish(reader, writer, conn, *response(200, body, [(b"X-Backend", state.name.encode())]))
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (ConnectionError, h11.RemoteProtocolError, asyncio.TimeoutError):
        return
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001
            pass


async def finish(reader, writer, conn: h11.Connection, resp, body: bytes) -> None:
    writer.write(conn.send(resp))
    if body:
        writer.write(conn.send(h11.Data(data=body)))
    if not (100 <= resp.status_code < 200):
        writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()


async def next_event(reader, conn: h11.Connection, timeout: float):
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await asyncio.wait_for(reader.read(256 * 1024), timeout)
            except asyncio.TimeoutError:
                return None
            conn.receive_data(data)
            continue
        return event


async def main(port: int, name: str, keepalive_timeout: float, tls=None) -> None:
    state = State(name, keepalive_timeout)
    ctx = None
    if tls is not None and tls.tls_cert:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls.tls_cert, tls.tls_key)
        if tls.tls_client_ca:
            ctx.load_verify_locations(tls.tls_client_ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL  # recorded; the control routes need none
    server = await asyncio.start_server(lambda r, w: handle(r, w, state), getattr(tls, "host", "127.0.0.1"), port,
                                        reuse_address=True, limit=1024 * 1024, ssl=ctx)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", default="b")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--keepalive-timeout", type=float, default=300.0)
    ap.add_argument("--tls-cert", default="")
    ap.add_argument("--tls-key", default="")
    ap.add_argument("--tls-client-ca", default="")
    a = ap.parse_args()
    try:
        asyncio.run(main(a.port, a.name, a.keepalive_timeout, a))
    except KeyboardInterrupt:
        pass
