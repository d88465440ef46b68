"""`lb demo`: lb in front of simulated backends, with built-in open-loop load.

Everything runs on 127.0.0.1 and stops by itself after `--duration` seconds
(or on Ctrl-C), leaving no process behind:
  * four simulated backends in one child process, each with a concurrency
    capacity and a service time: fast, slow, one that degrades ~10x for a
    while, and one that fails fast (5xx in well under a millisecond);
  * lb itself (`lb run`) with the chosen strategy and two workers;
  * an open-loop load generator in this process: requests are scheduled at a
    fixed rate and latency is measured from the scheduled send time, so a slow
    proxy cannot hide its queueing.
A compact table is printed every second: per backend share of traffic,
p50/p99 latency and errors, plus the totals.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time

from lb.demo_backends import SIMULATED, free_port


def _percentile(sorted_values: list[float], q: float) -> float:
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

    async def run(self, duration: float, on_tick) -> None:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
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


def _print_tick(load: Load, elapsed: float) -> None:
    rows: dict[str, list] = {}
    for backend, latency, ok in load.window:
        rows.setdefault(backend, []).append((latency, ok))
    n = max(1, len(load.window))
    print(f"\n t={elapsed:5.1f}s  {len(load.window)} req/s  total={load.total}  errors={load.errors}")
    print(f"   {'backend':<12}{'share':>7}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name in sorted(rows):
        lat = sorted(x[0] for x in rows[name])
        errs = sum(1 for x in rows[name] if not x[1])
        print(f"   {name:<12}{len(lat) / n * 100:6.1f}%{_percentile(lat, .5) * 1e3:9.1f}"
              f"{_percentile(lat, .99) * 1e3:9.1f}{errs:8d}")
    sys.stdout.flush()


def run_demo(args) -> int:
    procs: list[subprocess.Popen] = []
    tmp = tempfile.TemporaryDirectory(prefix="lb-demo-")
    ports = [free_port() for _ in SIMULATED]
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "lb.demo_backends", *map(str, ports)], stdout=subprocess.PIPE))
        if procs[0].stdout.readline().strip() != b"ready":
            print("lb demo: simulated backends failed to start", file=sys.stderr)
            return 1
        cfg = os.path.join(tmp.name, "demo.toml")
        lines = [f'listen = "127.0.0.1:{args.port}"', f'strategy = "{args.strategy}"',
                 "[admin]", f'listen = "127.0.0.1:{free_port()}"']
        for spec, port in zip(SIMULATED, ports):
            lines += ["[[backends]]", f'name = "{spec.name}"', f'address = "127.0.0.1:{port}"']
        with open(cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        lb = subprocess.Popen([sys.executable, "-m", "lb", "run", "-c", cfg, "-w", "2"],
                              stderr=subprocess.DEVNULL)
        procs.append(lb)
        time.sleep(1.5)
        if lb.poll() is not None:
            print(f"lb demo: lb failed to start (is port {args.port} free? use --port)", file=sys.stderr)
            return 1
        print(f"lb demo: lb on http://127.0.0.1:{args.port}/ strategy={args.strategy}, "
              f"{len(SIMULATED)} simulated backends "
              f"({', '.join(s.describe() for s in SIMULATED)}), "
              f"{args.rate:.0f} req/s for {args.duration:.0f}s. Ctrl-C stops.")
        load = Load(args.port, args.rate)
        try:
            asyncio.run(load.run(args.duration, _print_tick))
        except KeyboardInterrupt:
            pass
        print(f"\nlb demo: {load.total} requests, {load.errors} errors "
              f"({load.errors / max(1, load.total) * 100:.2f}%)")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        tmp.cleanup()
