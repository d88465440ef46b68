"""Interpreter cost of one proxied request, without sockets.

Drives a Downstream and an UpstreamConnection with in-memory transports: the
client's request goes in, the backend's response comes back, and the time per
round trip is pure Python (parser callbacks, header handling, strategy pick,
bookkeeping).  Usage: python bench/hotpath.py [N] [--profile]
"""

from __future__ import annotations

import sys
import time

from lb.core import config
from workers.downstream import Downstream
from workers.pool import Pool
from workers.upstream import UpstreamConnection

REQUEST = (
    b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n"
    b"Accept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 22:44:18 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 16\r\nConnection: keep-alive\r\n\r\n"
    b"hello from 9001\n"
)


class FakeTransport:
    def __init__(self):
        self.sent = 0

    def write(self, data):
        self.sent += 1

    def writelines(self, data):
        self.sent += 1

    def set_write_buffer_limits(self, *a, **k):
        pass

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self):
        return False

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        raise AssertionError("closed")


def setup():
    from workers.worker import Worker

    cfg = config.from_dict({"backends": [{"address": "127.0.0.1:9001"}], "strategy": "p2c_ewma"})
    w = Worker(cfg)
    b = w.backends[0]
    b.pool = Pool(b, None, None, max_idle=8, idle_timeout=60)
    up = UpstreamConnection(b, w)
    up.connection_made(FakeTransport())
    b.pool.idle.append(up)
    down = Downstream(w)
    down.connection_made(FakeTransport())
    return down, up


def run(n: int) -> float:
    down, up = setup()
    t0 = time.perf_counter()
    for _ in range(n):
        down.data_received(REQUEST)
        up.data_received(RESPONSE)
    return (time.perf_counter() - t0) / n * 1e6


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 200_000
    if "--profile" in sys.argv:
        import cProfile
        import pstats

        cProfile.run("run(n)", "/tmp/hotpath.prof")
        pstats.Stats("/tmp/hotpath.prof").sort_stats("tottime").print_stats(15)
    else:
        best = min(run(n) for _ in range(5))
        print(f"{best:.2f} us of interpreter time per proxied request (best of 5)")
