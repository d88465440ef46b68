"""Simulated backends for `lb demo`: servers with a capacity and a service time.

Each backend serves at most `capacity` requests at once (the rest queue), takes
`service_ms` (with random jitter) per request, and answers `X-Backend: NAME`.
`degrade` multiplies the service time by 10 during the middle third of every
30-second cycle; `fail_rate` answers 503 at once (no service time) for that
share of requests.

Run as `python -m lb.demo_backends PORT...` (one port per entry of SIMULATED);
prints "ready" once every listener is up.
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Spec:
    name: str
    capacity: int
    service_ms: float
    degrade: bool = False
    fail_rate: float = 0.0

    def describe(self) -> str:
        extra = ", degrades 10x" if self.degrade else ""
        extra += f", fails {self.fail_rate:.0%} fast" if self.fail_rate else ""
        return f"{self.name}: {self.capacity} slots x {self.service_ms:g} ms{extra}"


SIMULATED = (
    Spec("fast", capacity=16, service_ms=4),
    Spec("slow", capacity=8, service_ms=25),
    Spec("degrading", capacity=16, service_ms=5, degrade=True),
    Spec("failing", capacity=16, service_ms=3, fail_rate=0.8),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Simulated:
    def __init__(self, spec: Spec, seed: int, offset: float = 0.0) -> None:
        self.spec = spec
        self.slots = asyncio.Semaphore(spec.capacity)
        self.rng = random.Random(seed)
        self.start = time.monotonic() - offset  # offset: start this far into the cycle
        self.header = f"X-Backend: {spec.name}\r\n".encode()

    def service_time(self) -> float:
        t = self.spec.service_ms / 1000 * self.rng.lognormvariate(0, 0.3)
        if self.spec.degrade and 10 <= (time.monotonic() - self.start) % 30 < 20:
            t *= 10
        return t

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                low = head.lower()
                length = 0
                for line in low.split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                if self.rng.random() < self.spec.fail_rate:
                    body = b"unavailable\n"
                    status = b"503 Service Unavailable"
                else:
                    async with self.slots:
                        await asyncio.sleep(self.service_time())
                    body = b'{"ok": true}\n'
                    status = b"200 OK"
                writer.write(b"HTTP/1.1 " + status + b"\r\n" + self.header
                             + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                             + body)
                if b"connection: close" in low:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()


async def serve(ports: list[int], offset: float = 0.0) -> None:
    servers = []
    for i, (spec, port) in enumerate(zip(SIMULATED, ports)):
        sim = Simulated(spec, seed=i + 1, offset=offset)
        servers.append(await asyncio.start_server(sim.handle, "127.0.0.1", port, reuse_address=True))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    args = sys.argv[1:]
    offset = 0.0
    if args[:1] == ["--offset"]:
        offset = float(args[1])
        args = args[2:]
    ports = [int(p) for p in args]
    if len(ports) != len(SIMULATED):
        raise SystemExit("usage: python -m lb.demo_backends [--offset S] "
                         + " ".join("PORT" for _ in SIMULATED))
    try:
        asyncio.run(serve(ports, offset))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
