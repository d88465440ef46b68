"""Simulated backends of one quality scenario, as real HTTP servers on 127.0.0.1.

One process serves every backend of a scenario, one port each (uvloop, raw
asyncio protocols, httptools: a few microseconds of CPU per request, so the
backends are not what is measured).  Each backend behaves as its
`scenarios.BackendSpec` says: at most `capacity` requests in service, the
rest wait in FIFO order; service time lognormal around `median_ms` times the
request class's cost (`/heavy` 5x `/light`) times the current phase's
slow-down; during a failing phase a request is answered 503 at once with the
phase's probability; a backend with `join_at` refuses connections (its socket
is bound, not listening) until then.  Answers carry `X-Backend: NAME`.

The scenario clock starts on SIGUSR1 (sent by the load generator's owner when
the measured load begins) and phases are fractions of `--duration`.  Before
that, backends serve at their base speed and late joiners refuse.

    python bench/scenario_backend.py --scenario NAME --ports P1,P2,... \
        --duration S [--seed N]

Prints "ready" once every port is bound (and listening when it should be).
SIGTERM/SIGINT stop it.  Timer resolution is the event loop's (about 1 ms),
which bounds how exactly a service time is honoured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import sys
import time
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import httptools  # noqa: E402

import scenarios as scn  # noqa: E402  (bench/scenarios.py)

OK_BODY = b'{"ok":true}\n'
FAIL_BODY = b"unavailable\n"


class Clock:
    """Scenario time as a fraction of the run; None until the run starts."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.start: float | None = None

    def frac(self) -> float | None:
        if self.start is None:
            return None
        return (time.monotonic() - self.start) / self.duration


class SimBackend:
    """One backend: capacity, FIFO queue, service times, phases."""

    def __init__(self, spec: scn.BackendSpec, clock: Clock, seed: int) -> None:
        self.spec = spec
        self.clock = clock
        self.rng = random.Random(seed)
        self.busy = 0
        self.queue: deque = deque()
        self.loop = asyncio.get_event_loop()
        name = spec.name.encode()
        self.ok = (b"HTTP/1.1 200 OK\r\nX-Backend: " + name
                   + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                   % len(OK_BODY) + OK_BODY)
        self.fail = (b"HTTP/1.1 503 Service Unavailable\r\nX-Backend: " + name
                     + b"\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
                     % len(FAIL_BODY) + FAIL_BODY)
        self.ok_close = self.ok.replace(b"\r\nX-Backend", b"\r\nConnection: close\r\nX-Backend", 1)
        self.fail_close = self.fail.replace(b"\r\nX-Backend", b"\r\nConnection: close\r\nX-Backend", 1)

    def factors(self) -> tuple[float, float]:
        frac = self.clock.frac()
        return (1.0, 0.0) if frac is None else self.spec.factors(frac)

    def submit(self, slot: list, cls: int) -> None:
        """A parsed request: answer at once (failing), serve, or queue."""
        slow, fail = self.factors()
        if fail and self.rng.random() < fail:
            slot[0] = False
            slot[2].ready()
            return
        if self.busy < self.spec.capacity:
            self._start(slot, cls, slow)
        else:
            self.queue.append((slot, cls))

    def _start(self, slot: list, cls: int, slow: float) -> None:
        self.busy += 1
        self.loop.call_later(scn.service_time(self.spec, cls, slow, self.rng), self._done, slot)

    def _done(self, slot: list) -> None:
        self.busy -= 1
        slot[0] = True
        slot[2].ready()
        if self.queue:
            nxt, cls = self.queue.popleft()
            self._start(nxt, cls, self.factors()[0])


class Conn(asyncio.Protocol):
    """One client connection: parses requests, answers them in order."""

    def __init__(self, backend: SimBackend) -> None:
        self.backend = backend
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.pending: deque[list] = deque()  # [outcome (None/True/False), close?, conn]
        self.cls = 0
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.transport.close()
        except httptools.HttpParserError:
            if not self.closed:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.cls = 1 if url.startswith(b"/heavy") else 0

    def on_message_complete(self) -> None:
        slot = [None, not self.parser.should_keep_alive(), self]
        self.pending.append(slot)
        self.backend.submit(slot, self.cls)

    def ready(self) -> None:
        """Some answer is ready: write every ready one at the head, in order."""
        if self.closed:
            self.pending.clear()
            return
        b = self.backend
        while self.pending and self.pending[0][0] is not None:
            ok, close, _ = self.pending.popleft()
            if close:
                self.transport.write(b.ok_close if ok else b.fail_close)
                self.transport.close()
                self.closed = True
                self.pending.clear()
                return
            self.transport.write(b.ok if ok else b.fail)


def bound_socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.setblocking(False)
    return s


async def serve(sc: scn.Scenario, ports: list[int], duration: float, seed: int) -> None:
    loop = asyncio.get_running_loop()
    clock = Clock(duration)
    stop = loop.create_future()
    servers = []
    late: list[tuple[float, socket.socket, SimBackend]] = []

    async def listen(sock: socket.socket, backend: SimBackend) -> None:
        sock.listen(1024)
        servers.append(await loop.create_server(lambda: Conn(backend), sock=sock))

    for i, (spec, port) in enumerate(zip(sc.backends, ports)):
        backend = SimBackend(spec, clock, seed * 7919 + i)
        sock = bound_socket(port)  # bound now: the port is ours; refused until listening
        if spec.join_at > 0:
            late.append((spec.join_at, sock, backend))
        else:
            await listen(sock, backend)

    def start() -> None:
        if clock.start is not None:
            return
        clock.start = time.monotonic()
        for at, sock, backend in late:
            loop.call_later(at * duration, lambda s=sock, b=backend: loop.create_task(listen(s, b)))

    loop.add_signal_handler(signal.SIGUSR1, start)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    os.write(1, b"ready\n")
    await stop
    for s in servers:
        s.close()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", required=True, help=", ".join(scn.SCENARIOS))
    ap.add_argument("--ports", required=True, help="comma-separated, one per backend")
    ap.add_argument("--duration", type=float, required=True, help="run length, s (phases scale)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        args.sc = scn.get(args.scenario)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        args.ports = [int(p) for p in args.ports.split(",")]
    except ValueError:
        ap.error(f"--ports: not a list of integers: {args.ports!r}")
    if len(args.ports) != len(args.sc.backends) or not all(0 < p < 65536 for p in args.ports):
        ap.error(f"--ports: scenario {args.scenario} needs {len(args.sc.backends)} ports (1-65535)")
    if args.duration <= 0:
        ap.error("--duration must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(args.sc, args.ports, args.duration, args.seed))
    except OSError as exc:
        print(f"scenario_backend: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
