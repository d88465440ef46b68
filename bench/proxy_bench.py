"""Side-by-side throughput of nginx, HAProxy and lb as reverse proxies.

All three proxies run with ONE worker, in front of the same two backends (one
nginx instance serving two ports with a small fixed body), driven by wrk.
On a 2-core machine the proxy under test is pinned to one CPU and wrk plus the
backend nginx to the other, so each proxy has exactly one core to itself.

Runs are interleaved (every round runs each proxy once, the starting proxy
rotating from round to round), each measured run is preceded by a short
warm-up that is not counted.  Per run: req/s, p99 latency (wrk --latency) and
the CPU time the proxy's worker process spent per request (utime + stime from
/proc/PID/stat, delta over the run / requests reported by wrk).

Usage:
    python bench/proxy_bench.py [--rounds 5] [--duration 5] [--connections 50]
                                [--python /path/to/python] [--json out.json]
                                [--tls ecdsa|rsa [--handshakes]]
                                [--workload get|post1k|get16k|get1m|chunked16k|gzip16k]

--workload: what every request is: `get` (default) the backends' 100-byte
answer; `post1k` a POST with a 1 KiB body (Content-Length); `get16k` and
`get1m` a file of that size (Content-Length); `chunked16k` 16 KiB of text
sent chunked (the backend's SSI filter drops the length); `gzip16k` the same
text compressed by the backend (Accept-Encoding: gzip), chunked.  Where the
backends' CPU is the limit (load util near 100%: gzip16k, get1m), compare
CPU per request rather than req/s.

--tls: every proxy terminates HTTPS with the same certificate (ECDSA P-256 or
RSA 2048, made for the run; bench/tlsconf.py), wrk speaks HTTPS over
keep-alive connections.  --handshakes: one request per connection
(Connection: close) with session resumption off everywhere, so req/s is full
handshakes per second and CPU per request is CPU per handshake.

Configs are rendered from bench/templates/ (@NAME@ placeholders) into a
temporary directory.  Needs nginx, haproxy, wrk and taskset on PATH (or in
/usr/sbin, /usr/bin), and psutil.  Everything listens on 127.0.0.1 on free
ports; every process started is stopped on exit (also on Ctrl-C), and the
temporary directory is removed.
Exit codes: 0 ok, 1 a run failed, 2 missing tool / bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

# bench/ is on sys.path: this script's directory
from cpus import CLK_TCK, cpu_busy, cpu_pair_problem, cpu_stat, cpu_ticks  # bench/cpus.py
from procs import REPO_ROOT, BenchError, Proc, UsageError, tool_version, wait_http, wait_log_line, which
from proxy_report import Run, fmt_latency, print_table, summarize  # bench/proxy_report.py
from servers import (  # bench/servers.py
    PROXIES,
    Backends,
    ProxyInfo,
    free_ports,
    resolve_workers,
    sanity_check,
    start_haproxy,
    start_lb,
    start_nginx,
)
from tlsconf import make_certificate  # bench/tlsconf.py
from wrk import WORKLOADS, WRK_MODE, check_workload, run_wrk, wrk_post_script  # bench/wrk.py

# --------------------------------------------------------------------------
# one measured run
# --------------------------------------------------------------------------


def measure(info: ProxyInfo, rnd: int, order: int, args, backend_pids: list[int]) -> Run:
    for pid in [info.measured_pid] + info.other_pids:
        if not os.path.exists(f"/proc/{pid}"):
            raise BenchError(f"{info.name}: process {pid} is gone; log:\n{info.proc.log_tail()}")
    others0 = sum(sum(cpu_ticks(p)) for p in info.other_pids)
    back0 = sum(sum(cpu_ticks(p)) for p in backend_pids)
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    u0, s0 = cpu_ticks(info.measured_pid)
    st0 = cpu_stat()
    t0 = time.monotonic()
    res, _ = run_wrk(info.port, args.duration, args.connections, args.threads, args.load_cpu)
    wall = time.monotonic() - t0
    st1 = cpu_stat()
    u1, s1 = cpu_ticks(info.measured_pid)
    ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    back1 = sum(sum(cpu_ticks(p)) for p in backend_pids)
    wrk_s = (ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)
    backend_s = (back1 - back0) / CLK_TCK
    others1 = sum(sum(cpu_ticks(p)) for p in info.other_pids)
    user_s = (u1 - u0) / CLK_TCK
    sys_s = (s1 - s0) / CLK_TCK
    n = max(res["requests"], 1)
    pbusy, psteal = cpu_busy(st0, st1, args.proxy_cpu)
    lbusy, lsteal = cpu_busy(st0, st1, args.load_cpu)
    return Run(
        proxy=info.name, round=rnd, order=order, wall_s=wall,
        cpu_user_s=user_s, cpu_sys_s=sys_s,
        cpu_us_per_req=(user_s + sys_s) * 1e6 / n,
        user_us_per_req=user_s * 1e6 / n,
        sys_us_per_req=sys_s * 1e6 / n,
        cpu_util=(user_s + sys_s) / wall,
        other_cpu_s=(others1 - others0) / CLK_TCK,
        wrk_cpu_s=wrk_s,
        backend_cpu_s=backend_s,
        load_util=(wrk_s + backend_s) / wall,
        proxy_cpu_busy=pbusy,
        load_cpu_busy=lbusy,
        steal=(psteal + lsteal) / 2,
        **res,
    )


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def check_tools(args) -> dict:
    missing = [t for t in ("nginx", "haproxy", "wrk", "taskset") if not which(t)]
    if missing:
        raise UsageError(
            "missing tool(s): " + ", ".join(missing)
            + " (Debian: apt-get install nginx haproxy wrk util-linux)"
        )
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise UsageError("psutil is not importable by this interpreter (pip install psutil)") from None
    if not hasattr(os, "sched_getaffinity"):
        raise UsageError("CPU pinning needs Linux (os.sched_getaffinity)")
    problem = cpu_pair_problem(args.proxy_cpu, args.load_cpu)
    if problem:
        raise UsageError(problem)
    py = args.python or sys.executable
    if "lb" in args.proxies:
        if not os.access(py, os.X_OK):
            raise UsageError(f"--python {py}: not an executable")
        p = subprocess.run(
            [py, "-c", "import sys, lb, workers, uvloop, httptools; "
                       "print(sys.executable); print(sys.version.replace(chr(10), ' ')); "
                       "print(lb.__file__)"],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
        )
        if p.returncode != 0:
            raise UsageError(f"--python {py} cannot import lb and its dependencies:\n{p.stderr.strip()}")
        exe, version, lb_file = p.stdout.strip().splitlines()[:3]
    else:
        exe = version = lb_file = ""
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "nginx": tool_version([which("nginx"), "-v"]),
        "haproxy": tool_version([which("haproxy"), "-v"]),
        "wrk": tool_version([which("wrk"), "-v"]),
        "lb_python": py,
        "lb_python_executable": exe,
        "lb_python_version": version,
        "lb_package": lb_file,
        "bench_python": sys.version.replace("\n", " "),
    }


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured run (default 5)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="seconds of uncounted warm-up before each run (default 1, 0: none)")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--python", help="interpreter that runs lb (default: this one)")
    ap.add_argument("--proxies", default=",".join(PROXIES),
                    help="comma-separated subset of nginx,haproxy,lb (default: all)")
    ap.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxy (default 0)")
    ap.add_argument("--load-cpu", type=int, default=1,
                    help="CPU for wrk and the backends (default 1)")
    ap.add_argument("--json", metavar="PATH", help="write raw results and summary as JSON")
    ap.add_argument("--keep-temp", action="store_true",
                    help="keep the temporary directory (configs, logs) for inspection")
    ap.add_argument("--tls", choices=("none", "ecdsa", "rsa"), default="none",
                    help="HTTPS with an ECDSA P-256 or RSA 2048 certificate (default: plain HTTP)")
    ap.add_argument("--handshakes", action="store_true",
                    help="with --tls: a new connection and a full handshake per request")
    ap.add_argument("--workload", choices=tuple(WORKLOADS), default="get",
                    help="what each request is (default get: a 100-byte answer)")
    args = ap.parse_args(argv)
    if args.handshakes and args.tls == "none":
        ap.error("--handshakes needs --tls ecdsa or --tls rsa")
    args.proxies = [p.strip() for p in args.proxies.split(",") if p.strip()]
    bad = [p for p in args.proxies if p not in PROXIES]
    if bad or not args.proxies:
        ap.error(f"--proxies: unknown {bad} (choose from {', '.join(PROXIES)})")
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0 or args.connections < 1 \
            or args.threads < 1:
        ap.error("--rounds, --duration, --connections, --threads must be >= 1, --warmup >= 0")
    if args.threads > args.connections:
        ap.error("--threads must not exceed --connections")
    return args


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def bench(args) -> int:
    meta = check_tools(args)
    print(f"machine: nproc {meta['nproc']}, usable CPUs {meta['affinity']}, kernel {meta['kernel']}")
    print(f"nginx:   {meta['nginx']}")
    print(f"haproxy: {meta['haproxy']}")
    print(f"wrk:     {meta['wrk']}")
    if "lb" in args.proxies:
        print(f"lb python: {meta['lb_python_executable']} (--python {meta['lb_python']})")
        print(f"           {meta['lb_python_version']}")
        print(f"           lb from {meta['lb_package']}")
    if args.tls != "none":
        what = "full handshakes (one request per connection, no resumption)" if args.handshakes \
            else "keep-alive requests"
        print(f"https: {args.tls} certificate, {what}")
    print(f"workload: {args.workload} ({' '.join(map(str, WORKLOADS[args.workload][:1]))}, "
          f"request body {WORKLOADS[args.workload][2]} bytes)")
    print(f"plan: {args.rounds} rounds x {len(args.proxies)} proxies, {args.duration}s runs "
          f"(+{args.warmup}s warm-up), wrk -t{args.threads} -c{args.connections}; "
          f"proxy on CPU {args.proxy_cpu}, wrk + backends on CPU {args.load_cpu}")
    sys.stdout.flush()

    tmp = tempfile.mkdtemp(prefix="proxy-bench-")
    os.chmod(tmp, 0o755)  # nginx workers drop to an unprivileged user when run as root
    procs: list[Proc] = []
    runs: list[Run] = []
    try:
        bport1, bport2, nport, hport, lport, aport, plain = free_ports(7)
        backends = Backends(tmp, [bport1, bport2], args.load_cpu)
        procs.append(backends.proc)
        infos: dict[str, ProxyInfo] = {}
        py = args.python or sys.executable
        tls = None
        if args.tls != "none":
            tls = make_certificate(tmp, args.tls, resume=not args.handshakes)
            WRK_MODE["scheme"] = "https"
        WRK_MODE["close"] = args.handshakes
        path, headers, body = WORKLOADS[args.workload]
        WRK_MODE["path"] = path
        WRK_MODE["headers"] = headers
        WRK_MODE["script"] = wrk_post_script(tmp, body) if body else None
        for name in args.proxies:
            if name == "nginx":
                infos[name] = start_nginx(tmp, nport, backends.ports, args.proxy_cpu, tls)
            elif name == "haproxy":
                infos[name] = start_haproxy(tmp, hport, backends.ports, args.proxy_cpu, tls)
            else:
                infos[name] = start_lb(tmp, lport, aport, backends.ports, args.proxy_cpu, py, tls, plain)
            procs.append(infos[name].proc)
        backends.wait_ready()
        for name, info in infos.items():
            if name == "lb":
                wait_log_line(info.proc, '"event":"worker_ready"', 60, "lb")
            wait_http(info.proc, info.port, 30, name, tls=info.tls)
            resolve_workers(info, args.proxy_cpu)
            note = sanity_check(info, backends.bodies) + "; " + check_workload(info, args.workload)
            print(f"{name:<8} 127.0.0.1:{info.port}  worker pid {info.measured_pid} "
                  f"(pinned to CPU {args.proxy_cpu}; other pids {info.other_pids}); {note}")
        print(f"backends 127.0.0.1:{bport1}, 127.0.0.1:{bport2} (one nginx, pid {backends.proc.pid})")
        print()
        sys.stdout.flush()

        order = list(args.proxies)
        for rnd in range(1, args.rounds + 1):
            k = (rnd - 1) % len(order)
            this_round = order[k:] + order[:k]
            for pos, name in enumerate(this_round):
                info = infos[name]
                if args.warmup:
                    run_wrk(info.port, args.warmup, args.connections, args.threads, args.load_cpu)
                r = measure(info, rnd, pos, args, backends.pids)
                runs.append(r)
                warn = ""
                if r.socket_errors or r.non_2xx:
                    warn = f"  !! {r.socket_errors} socket errors, {r.non_2xx} non-2xx"
                print(f"round {rnd}/{args.rounds} {name:<8} {r.rps:>10,.0f} req/s  "
                      f"p99 {fmt_latency(r.p99_s):>8}  CPU {r.cpu_us_per_req:6.2f} us/req "
                      f"(user {r.user_us_per_req:5.2f}, sys {r.sys_us_per_req:5.2f})  "
                      f"util {r.cpu_util * 100:3.0f}% of CPU{args.proxy_cpu} "
                      f"(busy {r.proxy_cpu_busy * 100:3.0f}%)  load {r.load_util * 100:3.0f}% "
                      f"of CPU{args.load_cpu} (busy {r.load_cpu_busy * 100:3.0f}%){warn}")
                sys.stdout.flush()
    finally:
        for p in reversed(procs):
            p.stop()
        if args.keep_temp:
            print(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(runs, args.proxies)
    print()
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": {k: v for k, v in vars(args).items()},
                       "runs": [asdict(r) for r in runs], "summary": summary}, f, indent=2)
        print(f"raw results written to {args.json}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        return bench(args)
    except UsageError as exc:
        print(f"proxy_bench: {exc}", file=sys.stderr)
        return 2
    except BenchError as exc:
        print(f"proxy_bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("proxy_bench: interrupted, processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
