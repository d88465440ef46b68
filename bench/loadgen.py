"""Open-loop HTTP/1.1 load generator (raw asyncio protocols + httptools).

Requests are sent at the times of a schedule fixed in advance (see
`scenarios.arrivals`), whatever happens to earlier requests, and each
request's latency is measured from its SCHEDULED send time: a request that
had to wait for a free connection, or that the generator sent late, is not
flattered (no coordinated omission).  The event loop's timers have ~1 ms
resolution, so a request may leave up to ~1.5 ms before its time instead of
spinning for it; its latency then counts from when it was actually sent.

Connections are keep-alive, one request at a time each; when every open
connection is busy a new one is opened, up to `max_connections`; beyond that
requests wait for the first free connection (their clock keeps running).
A request without a complete answer `timeout` seconds after its scheduled
time counts as an error (status 0) at exactly `timeout`, and its connection
is closed; so does a connection refused, reset or closed under a request.

Per request one record: (scheduled time from the start, latency s,
status (0 = none), X-Backend of the answer or "-").
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

import httptools

from scenarios import PATHS  # bench/scenarios.py

Record = tuple[float, float, int, str]
EARLY = 0.001  # a request may be sent this much before its scheduled time


class _Client(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    __slots__ = ("gen", "transport", "parser", "req", "status", "backend", "keep", "dead")

    def __init__(self, gen: LoadGen) -> None:
        self.gen = gen
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.req: tuple[float, int, float] | None = None  # (origin, class, scheduled)
        self.status = 0
        self.backend = "-"
        self.keep = True
        self.dead = False

    # -- asyncio ----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail()

    def connection_lost(self, exc) -> None:
        if not self.dead:
            self._fail()

    # -- httptools --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 9 and name.lower() == b"x-backend":
            self.backend = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        req = self.req
        if req is None:
            return
        self.req = None
        gen = self.gen
        gen._record(req, self.status, self.backend)
        if self.keep:
            gen._free(self)
        else:
            self.dead = True
            gen.open -= 1
            self.transport.close()
            gen._drain_waiting()

    # -- ours -------------------------------------------------------------------

    def send(self, req: tuple[float, int, float]) -> None:
        self.req = req
        self.status = 0
        self.backend = "-"
        self.transport.write(self.gen.heads[req[1]])

    def _fail(self) -> None:
        """Closed, reset or garbage under a request: that request is an error."""
        if self.dead:
            return
        self.dead = True
        gen = self.gen
        gen.open -= 1
        try:
            gen.idle.remove(self)
        except ValueError:
            pass
        req = self.req
        self.req = None
        if req is not None:
            gen._record(req, 0, "-")
        if self.transport is not None:
            self.transport.close()
        gen._drain_waiting()


class LoadGen:
    def __init__(self, port: int, schedule: list[tuple[float, int]], *,
                 host: str = "127.0.0.1", max_connections: int = 512,
                 timeout: float = 2.0) -> None:
        if max_connections < 1 or timeout <= 0:
            raise ValueError("max_connections must be >= 1 and timeout > 0")
        self.host = host
        self.port = port
        self.schedule = schedule
        self.max_connections = max_connections
        self.timeout = timeout
        self.heads = [b"GET " + p.encode() + b" HTTP/1.1\r\nHost: bench\r\n\r\n" for p in PATHS]
        self.records: list[Record] = []
        self.idle: list[_Client] = []
        self.busy: set[_Client] = set()
        self.waiting: deque[tuple[float, int, float]] = deque()
        self.open = 0  # connections open or opening
        self.opened = 0  # connections ever opened
        self.max_open = 0
        self.late_sends = 0  # requests sent > 1 ms after their scheduled time
        self.start = 0.0
        self.outstanding = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._all_done: asyncio.Future | None = None

    # -- bookkeeping --------------------------------------------------------------

    def _record(self, req: tuple[float, int, float], status: int, backend: str) -> None:
        latency = time.monotonic() - self.start - req[0]
        if latency > self.timeout:
            # answered, but after the client gave up (between two sweeps)
            status, latency, backend = 0, self.timeout, "-"
        self.records.append((req[2], latency, status, backend))
        self.outstanding -= 1
        if self.outstanding == 0 and self._all_done is not None and not self._all_done.done():
            self._all_done.set_result(None)

    def _free(self, client: _Client) -> None:
        self.busy.discard(client)
        if self.waiting:
            self._send_on(client, self.waiting.popleft())
        else:
            self.idle.append(client)

    def _drain_waiting(self) -> None:
        while self.waiting and self.open < self.max_connections:
            self._connect(self.waiting.popleft())

    def _send_on(self, client: _Client, req: tuple[float, int, float]) -> None:
        self.busy.add(client)
        if time.monotonic() - self.start - req[2] > 0.001:
            self.late_sends += 1
        client.send(req)

    def _connect(self, req: tuple[float, int, float]) -> None:
        self.open += 1
        self.opened += 1
        self.max_open = max(self.max_open, self.open)
        self.loop.create_task(self._open_and_send(req))

    async def _open_and_send(self, req: tuple[float, int, float]) -> None:
        client = _Client(self)
        try:
            await self.loop.create_connection(lambda: client, self.host, self.port)
        except OSError:
            client.dead = True
            self.open -= 1
            self._record(req, 0, "-")
            self._drain_waiting()
            return
        self._send_on(client, req)

    def _submit(self, sched: float, cls: int, now: float) -> None:
        # Latency counts from the scheduled time, or from now if sent early.
        req = (sched if sched >= now else now, cls, sched)
        self.outstanding += 1
        if self.idle:
            self._send_on(self.idle.pop(), req)
        elif self.open < self.max_connections:
            self._connect(req)
        else:
            self.waiting.append(req)

    def _sweep(self) -> None:
        """Requests past the timeout: error records, their connections closed."""
        now = time.monotonic() - self.start
        limit = now - self.timeout
        for client in [c for c in self.busy if c.req is not None and c.req[0] < limit]:
            self.busy.discard(client)
            client._fail()
        while self.waiting and self.waiting[0][0] < limit:
            self._record(self.waiting.popleft(), 0, "-")
        self.busy = {c for c in self.busy if not c.dead}

    # -- the run ----------------------------------------------------------------------

    async def run(self, on_start: Callable[[], None] | None = None) -> list[Record]:
        """Send the whole schedule; return when every request has an outcome."""
        loop = self.loop = asyncio.get_running_loop()
        sweeper = loop.create_task(self._sweeper())
        if on_start is not None:
            on_start()
        self.start = time.monotonic()
        clock = time.monotonic
        start = self.start
        i = 0
        n = len(self.schedule)
        sched = self.schedule
        try:
            while i < n:
                now = clock() - start
                while i < n and sched[i][0] <= now + EARLY:
                    self._submit(sched[i][0], sched[i][1], now)
                    i += 1
                if i < n:
                    # >= 1 ms: a shorter timer would fire at once and spin.
                    await asyncio.sleep(max(0.001, sched[i][0] - EARLY - (clock() - start)))
            self._all_done = loop.create_future()
            if self.outstanding > 0:
                await asyncio.wait_for(self._all_done, self.timeout + 5.0)
        finally:
            sweeper.cancel()
            for c in list(self.idle) + list(self.busy):
                c.dead = True
                if c.transport is not None:
                    c.transport.close()
            self.idle.clear()
            self.busy.clear()
        return self.records

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            self._sweep()


def run_load(port: int, schedule: list[tuple[float, int]], *, on_start=None,
             max_connections: int = 512, timeout: float = 2.0) -> tuple[list[Record], LoadGen]:
    """Run one load in a fresh event loop (uvloop when available)."""
    gen = LoadGen(port, schedule, max_connections=max_connections, timeout=timeout)
    try:
        import uvloop

        records = uvloop.run(gen.run(on_start))
    except ImportError:
        records = asyncio.run(gen.run(on_start))
    return records, gen
