"""The demo's load: open-loop HTTP/1.1 requests at a fixed rate over a pool of
keep-alive connections, latency measured from each request's scheduled send
time (a slow proxy cannot hide its queueing), a per-second window for the
view (lb/demo.py)."""

from __future__ import annotations

import asyncio
import time


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[k]


class Load:
    """Open-loop HTTP/1.1 load over a pool of keep-alive connections."""

    def __init__(self, port: int, rate: float, connections: int = 64) -> None:
        self.port = port
        self.rate = rate
        self.idle: list = []
        self.max_connections = connections
        self.open = 0
        self.window: list[tuple[str, float, bool]] = []  # (backend, latency, ok)
        self.total = 0
        self.errors = 0
        self.all: list[tuple[str, float, bool]] = []  # kept for --compare
        self.record_after: float | None = None  # seconds into the run; None: keep nothing
        self.started = time.monotonic()

    async def _conn(self):
        if self.idle:
            return self.idle.pop()
        self.open += 1
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def one(self, scheduled: float, path: bytes) -> None:
        backend, ok = "-", False
        try:
            reader, writer = await self._conn()
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: demo\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                low = line.lower()
                if low.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
                elif low.startswith(b"x-backend:"):
                    backend = line.split(b":", 1)[1].strip().decode()
            if length:
                await reader.readexactly(length)
            ok = status < 500
            if b"connection: close" in head.lower():
                writer.close()
                self.open -= 1
            else:
                self.idle.append((reader, writer))
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            self.open = max(0, self.open - 1)
        latency = time.monotonic() - scheduled
        self.total += 1
        if not ok:
            self.errors += 1
        self.window.append((backend, latency, ok))
        if self.record_after is not None and scheduled - self.started >= self.record_after:
            self.all.append((backend, latency, ok))

    async def run(self, duration: float, on_tick) -> None:
        loop = asyncio.get_running_loop()
        start = self.started = time.monotonic()
        interval = 1.0 / self.rate
        n = 0
        tasks: set = set()
        next_tick = start + 1.0
        while True:
            now = time.monotonic()
            if now - start >= duration:
                break
            while start + n * interval <= now:
                scheduled = start + n * interval
                path = b"/api/items" if n % 4 else b"/api/report"
                t = loop.create_task(self.one(scheduled, path))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                n += 1
            if now >= next_tick:
                on_tick(self, now - start)
                self.window = []
                next_tick += 1.0
            await asyncio.sleep(min(interval, 0.005))
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        for _r, w in self.idle:
            w.close()
