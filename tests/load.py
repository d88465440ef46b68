"""A steady GET load on one keep-alive connection (reconnecting after an error),
recording which backend answered each request or what went wrong."""

from __future__ import annotations

import http.client
import threading
import time


class Load(threading.Thread):
    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.results: list[tuple[float, str]] = []  # (time, backend or error)
        self.stop = threading.Event()

    def run(self) -> None:
        conn = None
        while not self.stop.is_set():
            t = time.time()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/")
                r = conn.getresponse()
                r.read()
                self.results.append((t, r.getheader("X-Backend") if r.status == 200 else f"status {r.status}"))
            except (OSError, http.client.HTTPException) as exc:
                self.results.append((t, f"error {exc!r}"))
                conn = None
            self.stop.wait(0.003)  # (paced: a few hundred requests a second)

    def errors(self) -> list:
        return [r for r in self.results if r[1].startswith(("error", "status"))]

    def share(self, name: str, t0: float, t1: float) -> float:
        window = [b for t, b in self.results if t0 <= t < t1]
        return sum(b == name for b in window) / max(1, len(window))


def stop_all(loads) -> None:
    """Stop every load at once, then wait for each to end."""
    for load in loads:
        load.stop.set()
    for load in loads:
        load.join(10)
