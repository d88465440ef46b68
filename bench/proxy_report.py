"""What bench/proxy_bench.py reports: one measured run (`Run`), the summary
over runs per proxy with lb's ratios to nginx and HAProxy, and its table.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


def fmt_latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f}ms"
    return f"{seconds:.2f}s"


@dataclass
class Run:
    proxy: str
    round: int
    order: int
    rps: float
    requests: int
    wrk_seconds: float
    p50_s: float | None
    p90_s: float | None
    p99_s: float
    socket_errors: int
    non_2xx: int
    wall_s: float
    cpu_user_s: float
    cpu_sys_s: float
    cpu_us_per_req: float
    user_us_per_req: float
    sys_us_per_req: float
    cpu_util: float  # proxy worker CPU seconds / wall seconds
    other_cpu_s: float  # the proxy's other processes (masters, supervisor)
    wrk_cpu_s: float
    backend_cpu_s: float
    load_util: float  # (wrk + backend nginx CPU seconds) / wall seconds, on the load CPU
    proxy_cpu_busy: float  # whole-CPU busy fraction of the proxy's CPU (anyone's work)
    load_cpu_busy: float
    steal: float  # hypervisor steal, both CPUs averaged


def summarize(runs: list[Run], proxies: list[str]) -> dict:
    out = {}
    for name in proxies:
        rs = [r for r in runs if r.proxy == name]
        if not rs:
            continue
        med = statistics.median
        out[name] = {
            "runs": len(rs),
            "best_rps": max(r.rps for r in rs),
            "median_rps": med(r.rps for r in rs),
            "median_p99_s": med(r.p99_s for r in rs),
            "median_cpu_us_per_req": med(r.cpu_us_per_req for r in rs),
            "median_user_us_per_req": med(r.user_us_per_req for r in rs),
            "median_sys_us_per_req": med(r.sys_us_per_req for r in rs),
            "median_cpu_util": med(r.cpu_util for r in rs),
            "median_load_util": med(r.load_util for r in rs),
            "errors": sum(r.socket_errors + r.non_2xx for r in rs),
        }
    if "lb" in out:
        lb = out["lb"]
        for ref in ("nginx", "haproxy"):
            if ref in out:
                o = out[ref]
                lb[f"vs_{ref}"] = {
                    "best_rps_ratio": lb["best_rps"] / o["best_rps"],
                    "median_rps_ratio": lb["median_rps"] / o["median_rps"],
                    "cpu_per_req_ratio": lb["median_cpu_us_per_req"] / o["median_cpu_us_per_req"],
                }
    return out


def print_table(summary: dict) -> None:
    head = (f"{'proxy':<8} {'runs':>4} {'best req/s':>11} {'median req/s':>13} {'median p99':>11} "
            f"{'CPU us/req':>10} {'user':>6} {'sys':>6} {'CPU util':>8} {'load util':>9} {'errors':>6}")
    print(head)
    print("-" * len(head))
    for name, s in summary.items():
        print(f"{name:<8} {s['runs']:>4} {s['best_rps']:>11,.0f} {s['median_rps']:>13,.0f} "
              f"{fmt_latency(s['median_p99_s']):>11} {s['median_cpu_us_per_req']:>10.2f} "
              f"{s['median_user_us_per_req']:>6.2f} {s['median_sys_us_per_req']:>6.2f} "
              f"{s['median_cpu_util'] * 100:>7.0f}% {s['median_load_util'] * 100:>8.0f}% "
              f"{s['errors']:>6}")
    lb = summary.get("lb", {})
    for ref in ("nginx", "haproxy"):
        r = lb.get(f"vs_{ref}")
        if r:
            print(f"lb / {ref:<8} req/s best {r['best_rps_ratio']:.2f}x, "
                  f"median {r['median_rps_ratio']:.2f}x; "
                  f"CPU per request {r['cpu_per_req_ratio']:.2f}x")
    print("(medians over runs.  CPU us/req, user, sys: the proxy's worker process only, "
          "utime+stime per request.\n CPU util: that worker's CPU time / wall time.  load util: "
          "wrk + backend nginx CPU time / wall time.\n A run where the CPU is 'busy' well above "
          "the util shown for it was shared with foreign work: trust best-of more than median.)")
