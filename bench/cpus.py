"""CPU time and CPU pinning, from /proc and taskset.

CPU time of a process (`cpu_ticks`), how busy each CPU was between two
samples (`cpu_stat`, `cpu_busy`), whether a proxy CPU and a load CPU can be
used (`cpu_pair_problem`), and pinning every thread of a process (`pin`).
Used by bench/proxy_bench.py, bench/servers.py and bench/quality.py.
"""

from __future__ import annotations

import os
import subprocess

from procs import BenchError  # bench/procs.py

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a whole process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        data = f.read()
    rest = data[data.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime is field 14, stime field 15.
    return int(rest[11]), int(rest[12])


def cpu_stat() -> dict[int, tuple[int, int, int]]:
    """Per CPU from /proc/stat: (busy, total, steal) in clock ticks."""
    out = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
            total = sum(v)
            out[int(name[3:])] = (total - v[3] - v[4], total, v[7])
    return out


def cpu_busy(before: dict, after: dict, cpu: int) -> tuple[float, float]:
    """(busy fraction, steal fraction) of one CPU between two cpu_stat() samples."""
    b0, t0, s0 = before[cpu]
    b1, t1, s1 = after[cpu]
    total = max(t1 - t0, 1)
    return (b1 - b0) / total, (s1 - s0) / total


def cpu_pair_problem(proxy_cpu: int, load_cpu: int) -> str | None:
    """Why --proxy-cpu/--load-cpu cannot be used (None when they can)."""
    avail = os.sched_getaffinity(0)
    for opt, cpu in (("--proxy-cpu", proxy_cpu), ("--load-cpu", load_cpu)):
        if cpu not in avail:
            return f"{opt} {cpu}: CPU not available (allowed: {sorted(avail)})"
    if proxy_cpu == load_cpu:
        return "--proxy-cpu and --load-cpu must differ"
    return None


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of pid to one CPU with taskset, then verify."""
    p = subprocess.run(
        ["taskset", "-a", "-pc", str(cpu), str(pid)], capture_output=True, text=True, timeout=10
    )
    if p.returncode != 0:
        raise BenchError(f"taskset -a -pc {cpu} {pid} failed: {p.stderr.strip()}")
    got = os.sched_getaffinity(pid)
    if got != {cpu}:
        raise BenchError(f"pid {pid} affinity is {sorted(got)} after pinning to {cpu}")
