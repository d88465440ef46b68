"""A process's resident memory, sampled while a test runs."""

from __future__ import annotations

import threading

import psutil


class RssSampler(threading.Thread):
    """Samples one process's RSS every `interval` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append(self.proc.memory_info().rss)
            self.halt.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.halt.set()
        self.join(5)


def single_worker(lb) -> int:
    pids = lb.worker_pids()
    assert len(pids) == 1, pids
    return pids[0]
