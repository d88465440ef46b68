"""Request and response bodies are streamed with every framing, in bounded worker memory."""

import hashlib
import json
import os
import socket
import time

import psutil
import pytest

from tests.rss import RssSampler, single_worker
from tests.rawhttp import RawConn, build_request, chunk_body

MiB = 1024 * 1024
GiB = 1024 * MiB
RSS_GROWTH_LIMIT = 40 * MiB


def drain_result(resp) -> dict:
    assert resp.status == 200, resp.head
    return json.loads(resp.body)


# -- request bodies ------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 65_535, 3 * MiB + 7])
def test_content_length_request_body_reaches_backend_intact(lb, size):
    body = os.urandom(size)
    with RawConn(lb.port) as c:
        c.send(build_request("POST", "/drain", {"Content-Length": str(size)}))
        # The body follows in uneven pieces, as a real client would send it.
        for i in range(0, size, 100_003):
            c.send(body[i : i + 100_003])
        got = drain_result(c.read_response())
        assert got == {"size": size, "sha256": hashlib.sha256(body).hexdigest()}
        # And the connection carries the next request.
        assert c.request("GET", "/").body == b"backend b1\n"


def test_chunked_request_body_reaches_backend_intact(lb, backend):
    pieces = [os.urandom(n) for n in (1, 15, 16, 4096, 65_536, 1_000_003, 2, 300_000)]
    body = b"".join(pieces)
    with RawConn(lb.port) as c:
        wire = chunk_body(pieces)
        c.send(build_request("POST", "/drain", {"Transfer-Encoding": "chunked"}))
        for i in range(0, len(wire), 77_777):
            c.send(wire[i : i + 77_777])
        got = drain_result(c.read_response())
        assert got == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        assert c.request("GET", "/").body == b"backend b1\n"
    assert backend.requests()[0]["body_size"] == len(body)


def test_chunked_request_body_with_extensions_and_trailers(lb):
    wire = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    with RawConn(lb.port) as c:
        c.send(build_request("POST", "/drain", {"Transfer-Encoding": "chunked"}) + wire)
        got = drain_result(c.read_response())
    assert got == {"size": 11, "sha256": hashlib.sha256(b"hello world").hexdigest()}


# -- response bodies -----------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 262_144, 5 * MiB + 3])
def test_content_length_response_body(lb, size):
    with RawConn(lb.port) as c:
        for _ in range(2):
            resp = c.request("GET", f"/bytes/{size}")
            assert resp.status == 200
            assert resp.values("content-length") == [str(size)]
            assert resp.values("transfer-encoding") == []
            assert resp.body == b"x" * size


@pytest.mark.parametrize("size", [1, 262_144, 5 * MiB + 3])
def test_chunked_response_body_to_http11_client(lb, size):
    with RawConn(lb.port) as c:
        for _ in range(2):
            resp = c.request("GET", f"/chunked/{size}")
            assert resp.status == 200
            assert resp.values("transfer-encoding") == ["chunked"]
            assert resp.values("content-length") == []
            assert resp.body == b"x" * size  # read_chunked checks the chunk syntax


@pytest.mark.parametrize("size", [1, 5 * MiB + 3])
def test_close_delimited_response_is_rechunked_for_http11_client(lb, size):
    with RawConn(lb.port) as c:
        resp = c.request("GET", f"/nolength/{size}")
        assert resp.status == 200
        assert resp.values("transfer-encoding") == ["chunked"], resp.head
        assert resp.values("content-length") == []
        assert resp.body == b"x" * size


def test_rechunked_response_keeps_client_connection(lb):
    with RawConn(lb.port) as c:
        resp = c.request("GET", "/nolength/100000")
        assert resp.values("transfer-encoding") == ["chunked"], resp.head
        assert resp.body == b"x" * 100_000
        assert "close" not in resp.connection_tokens()
        assert c.request("GET", "/").body == b"backend b1\n"


@pytest.mark.parametrize("route", ["nolength", "chunked"])
def test_unframed_response_to_http10_client_is_close_delimited(lb, route):
    size = 3 * MiB + 5
    with RawConn(lb.port) as c:
        c.send(build_request("GET", f"/{route}/{size}", {"Host": "lb.test"}, version="1.0"))
        resp = c.read_head()
        assert resp.status == 200
        assert resp.values("transfer-encoding") == []
        assert resp.values("content-length") == []
        body = c.read_until_close()
    assert len(body) == size and body == b"x" * size


# -- big transfers: worker memory stays flat --------------------------------------


def warm_up(lb) -> int:
    """Run a few requests through the worker so its baseline RSS includes the steady state."""
    with RawConn(lb.port) as c:
        for _ in range(3):
            assert c.request("POST", "/drain", body=b"w" * 300_000).status == 200
            assert len(c.request("GET", "/bytes/1000000").body) == 1_000_000
    return psutil.Process(single_worker(lb)).memory_info().rss


def assert_flat(baseline: int, samples: list[int]) -> None:
    assert len(samples) >= 3, "transfer too short to sample"
    growth = max(samples) - baseline
    assert growth < RSS_GROWTH_LIMIT, (
        f"worker RSS grew by {growth / MiB:.1f} MiB (baseline {baseline / MiB:.1f} MiB, "
        f"peak {max(samples) / MiB:.1f} MiB)"
    )


def test_one_gib_upload_streams_in_flat_memory(backend, lb_factory):
    lb = lb_factory([backend], workers=1)
    baseline = warm_up(lb)
    piece = os.urandom(MiB)  # one buffer, sent 1024 times
    count = GiB // MiB
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(piece)
    expected = {"size": GiB, "sha256": digest.hexdigest()}

    s = socket.create_connection(("127.0.0.1", lb.port), timeout=30)
    try:
        t0 = time.monotonic()
        with RssSampler(single_worker(lb)) as sampler:
            s.sendall(build_request("POST", "/drain", {"Content-Length": str(GiB)}))
            view = memoryview(piece)
            for _ in range(count):
                s.sendall(view)
            got = drain_result(RawConn.from_socket(s).read_response())
        elapsed = time.monotonic() - t0
    finally:
        s.close()
    assert got == expected
    assert_flat(baseline, sampler.samples)
    assert elapsed < 60, f"1 GiB upload took {elapsed:.1f}s"


def download_counting(s: socket.socket, slow_for: float = 0.0) -> tuple[int, dict[str, str], bool]:
    """Read one response head and its Content-Length body from `s`, counting bytes (never keeping them).

    During the first `slow_for` seconds the body is read in small, spaced-out reads.
    Returns (body bytes, lower-cased headers, whether every byte was b"x").
    """
    buf = bytearray(MiB)
    view = memoryview(buf)
    head = b""
    while b"\r\n\r\n" not in head:
        n = s.recv_into(buf, 65536)
        assert n, "closed before the response head"
        head += bytes(view[:n])
    head, _, rest = head.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), lines[0]
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    total = int(headers["content-length"])
    got = len(rest)
    all_x = rest.count(b"x") == len(rest)
    slow_until = time.monotonic() + slow_for
    while got < total:
        if time.monotonic() < slow_until:
            n = s.recv_into(buf, 16384)
            time.sleep(0.05)
        else:
            n = s.recv_into(buf, min(MiB, total - got))
        assert n, f"connection closed after {got} of {total} body bytes"
        got += n
        if all_x and buf.count(b"x", 0, n) != n:
            all_x = False
    return got, headers, all_x


def test_one_gib_download_streams_in_flat_memory(backend, lb_factory):
    lb = lb_factory([backend], workers=1)
    baseline = warm_up(lb)
    s = socket.create_connection(("127.0.0.1", lb.port), timeout=30)
    try:
        t0 = time.monotonic()
        with RssSampler(single_worker(lb)) as sampler:
            s.sendall(build_request("GET", f"/bytes/{GiB}"))
            got, headers, all_x = download_counting(s)
        elapsed = time.monotonic() - t0
        # The connection is still in sync: the next response starts right here.
        s.sendall(build_request("GET", "/"))
        assert RawConn.from_socket(s).read_response().body == b"backend b1\n"
    finally:
        s.close()
    assert headers["content-length"] == str(GiB)
    assert got == GiB and all_x
    assert_flat(baseline, sampler.samples)
    assert elapsed < 60, f"1 GiB download took {elapsed:.1f}s"


def test_slow_reader_download_stays_in_flat_memory(backend, lb_factory):
    lb = lb_factory([backend], workers=1)
    baseline = warm_up(lb)
    size = 64 * MiB
    s = socket.socket()
    # A small, fixed receive buffer: the kernel cannot soak up what the client does not read.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.settimeout(30)
    s.connect(("127.0.0.1", lb.port))
    try:
        with RssSampler(single_worker(lb), interval=0.1) as sampler:
            s.sendall(build_request("GET", f"/bytes/{size}"))
            got, headers, all_x = download_counting(s, slow_for=2.0)
    finally:
        s.close()
    assert got == size and all_x
    assert_flat(baseline, sampler.samples)


def test_tiny_response_chunks_are_rechunked_per_read(lb_factory):
    # A backend writing 20,000 one-byte chunks in a few writes: the client gets
    # the same body, framed as a few large chunks (one per read), not 20,000.
    from tests.rawhttp import ThreadedServer

    body = bytes(range(256)) * 78 + b"end!"
    wire = b"".join(b"1\r\n%s\r\n" % body[i:i + 1] for i in range(len(body))) + b"0\r\n\r\n"

    class TinyChunks(ThreadedServer):
        def handle(self, conn):
            try:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    buf += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(0, len(wire), 30_000):
                    conn.sendall(wire[i:i + 30_000])
                conn.recv(1)
            except OSError:
                pass
            finally:
                conn.close()

    srv = TinyChunks()
    try:
        lb = lb_factory([], backend_lines=f'[[backends]]\naddress = "{srv.address}"\nname = "tiny"')
        with RawConn(lb.port) as c:
            c.send(build_request("GET", "/"))
            resp = c.read_head()
            assert resp.values("transfer-encoding") == ["chunked"]
            sizes = []
            parts = []
            while True:
                size = int(c._line(), 16)
                if size == 0:
                    assert c._line() == b""
                    break
                parts.append(c.read_exact(size))
                sizes.append(size)
                assert c.read_exact(2) == b"\r\n"
        assert b"".join(parts) == body
        assert len(sizes) < 200, f"{len(sizes)} chunks for {len(body)} bytes"
    finally:
        srv.close()
