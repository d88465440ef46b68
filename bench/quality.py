"""Routing quality: every lb strategy, nginx least_conn and HAProxy leastconn,
in front of the same simulated backends, under the same open-loop load.

For each scenario of bench/scenarios.py and each policy, one run:
  * fresh backends (bench/scenario_backend.py, one process, one port per
    backend, same seed every run) pinned with the load generator to
    --load-cpu;
  * the proxy pinned to --proxy-cpu: `lb run -c <generated toml> -w 1` with
    the strategy under test (request class "heavy" = path prefix /heavy), or
    nginx (least_conn, upstream keepalive), or HAProxy (leastconn), both
    from bench/templates/*leastconn*;
  * the scenario clock starts with the load (SIGUSR1 to the backends), the
    load is the scenario's seeded Poisson schedule (bench/loadgen.py:
    latency from the scheduled send time, a request unanswered after
    --timeout is an error at the timeout).
Per scenario a table: p50, p99, p99.9 (over all requests, failed ones
included), error rate (5xx, timeouts, connection failures), time to divert
(scenarios with a slowdown: until the slowed backend's share over a sliding
0.25 s is below half its share before), share of requests answered by each
backend.

A scenario with `instances` > 1 (twolb) starts that many proxies of the
policy in front of the same backends (each lb with its own inference
process); the arrivals are split between them at random, and one table row
covers them all.

--busy: every run also (`--busy both`, the default when given) or only
(`--busy only`) with one busy-loop process per core beside it, unpinned, for
the duration of the run (each stops by itself shortly after it at the
latest), so the tables show how each policy does on a busy host.  Rows of busy
runs are labelled "busy".

Usage:
    python bench/quality.py [--scenario NAME[,NAME]|all|fleet<seed>] [--policies a,b]
                            [--duration 10] [--rate R] [--seed 1] [--timeout 2]
                            [--busy [both|only]] [--repeat N] [--quick] [--json FILE]
                            [--markdown]

--repeat N: N runs of every cell, interleaved (run 1 of every policy, then
run 2, ...), one table row each ("ml #2"), and under the table each
policy's median and range of p99, p99.9 and errors over its runs.

--quick: 2 s runs of round_robin, least_connections, p2c_ewma, ml, nginx and
HAProxy (about two minutes).  Exit codes: 0 ok, 1 a run failed, 2 missing
tool / bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# bench/ is on sys.path: this script's directory
import loadgen  # noqa: E402
import scenario_report as report  # bench/scenario_report.py
import scenarios as scn  # noqa: E402
from cpus import cpu_pair_problem  # bench/cpus.py
from procs import REPO_ROOT, BenchError, Proc, UsageError, tool_version, which  # bench/procs.py
from quality_procs import LABELS, lb_modes, start_backends, start_proxy  # bench/quality_procs.py
from servers import free_ports  # bench/servers.py

LB_POLICIES = ("round_robin", "weighted_round_robin", "least_connections", "random", "p2c_ewma", "prequal", "ml")
POLICIES = LB_POLICIES + ("nginx", "haproxy")
QUICK_POLICIES = ("round_robin", "least_connections", "p2c_ewma", "prequal", "ml", "nginx", "haproxy")


# --------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------


BUSY_LOOP = "import time\nend = time.monotonic() + {limit:.0f}\nwhile time.monotonic() < end:\n    pass\n"


def start_busy(tmp: str, seconds: float) -> list[Proc]:
    """One busy-loop process per core, unpinned; each ends by itself after
    `seconds` even if this script is killed."""
    code = BUSY_LOOP.format(limit=seconds)
    return [Proc(f"busy{i}", [sys.executable, "-c", code], os.path.join(tmp, f"busy{i}.log"))
            for i in range(os.cpu_count() or 1)]


def split_schedule(schedule: list[tuple[float, int]], n: int, seed: int) -> list[list[tuple[float, int]]]:
    """The arrivals dealt at random to `n` proxies (as clients spread over two lb's)."""
    if n == 1:
        return [schedule]
    rng = random.Random(seed * 31 + n)
    parts: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    for a in schedule:
        parts[int(rng.random() * n)].append(a)
    return parts


def run_loads(ports: list[int], schedules: list[list[tuple[float, int]]], args, on_start):
    """One load generator per proxy, in one event loop, started together.
    Returns (all records by send time, the generators)."""
    gens = [loadgen.LoadGen(p, sch, max_connections=args.connections, timeout=args.timeout)
            for p, sch in zip(ports, schedules)]
    if len(gens) == 1:
        records, gen = loadgen.run_load(ports[0], schedules[0], timeout=args.timeout,
                                        max_connections=args.connections, on_start=on_start)
        return records, [gen]

    async def all_of():
        results = await asyncio.gather(gens[0].run(on_start), *(g.run() for g in gens[1:]))
        return [r for rs in results for r in rs]

    try:
        import uvloop

        records = uvloop.run(all_of())
    except ImportError:
        records = asyncio.run(all_of())
    records.sort(key=lambda r: r[0])
    return records, gens


def spread(rows: list[report.Summary]) -> str:
    """Per policy over its repeated runs ("ml #1", "ml #2", ...): the median and
    the range of p99, p99.9 and the error rate, every run counted (not the best)."""
    groups: dict[str, list[report.Summary]] = {}
    for r in rows:
        groups.setdefault(r.policy.rsplit(" #", 1)[0], []).append(r)
    lines = ["spread over the runs (median, min-max):"]
    for name, rs in groups.items():
        def stat(values, fmt):
            v = sorted(values)
            return f"{fmt(report.percentile(v, 0.5))} ({fmt(v[0])}-{fmt(v[-1])})"

        pct = lambda x: f"{x * 100:.2f}%"  # noqa: E731
        lines.append(f"  {name}: {len(rs)} runs, p99 {stat([r.p99 for r in rs], report.fmt_ms)}, "
                     f"p99.9 {stat([r.p999 for r in rs], report.fmt_ms)}, "
                     f"errors {stat([r.error_rate for r in rs], pct)}")
    return "\n".join(lines)


def run_one(sc: scn.Scenario, policy: str, args, tmp_root: str, busy: bool = False) -> report.Summary:
    tmp = tempfile.mkdtemp(prefix=f"{sc.name}-{policy}-", dir=tmp_root)
    os.chmod(tmp, 0o755)  # nginx workers may drop privileges
    n = max(1, sc.instances)
    ports = free_ports(len(sc.backends) + n)
    bports, pports = ports[:-n], ports[-n:]
    procs: list[Proc] = []
    try:
        backends = start_backends(tmp, sc, bports, args.duration, args.seed, args.load_cpu)
        procs.append(backends)
        proxies = [start_proxy(tmp, policy, pport, sc, bports, args, k) for k, pport in enumerate(pports)]
        procs += proxies
        if busy:
            procs += start_busy(tmp, args.duration + 60)
        schedule = scn.run_schedule(sc, args.duration, args.rate, args.seed)
        t0 = time.time()
        records, gens = run_loads(pports, split_schedule(schedule, n, args.seed), args,
                                  on_start=lambda: os.kill(backends.pid, signal.SIGUSR1))
        for p in procs:
            if not p.alive():
                raise BenchError(f"{p.name} died during the run; log {p.log_path}:\n{p.log_tail()}")
        note = lb_modes(proxies[0], t0, t0 + args.duration) if policy == "ml" else ""
        label = LABELS.get(policy, policy) + (" busy" if busy else "")
        s = report.summarize(label, records, [b.name for b in sc.backends], note)
        s.divert = scn.divert_times(sc, records, args.duration)
        s.late = sum(g.late_sends for g in gens)  # type: ignore[attr-defined]
        s.connections = sum(g.opened for g in gens)  # type: ignore[attr-defined]
        return s
    finally:
        for p in reversed(procs):
            p.stop(grace=3.0)
        if not args.keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="all",
                    help=f"comma-separated subset of {','.join(scn.SCENARIOS)}, or all (default)")
    ap.add_argument("--policies", help="comma-separated subset of " + ",".join(POLICIES)
                    + " (default: all; --quick: " + ",".join(QUICK_POLICIES) + ")")
    ap.add_argument("--duration", type=float, help="seconds of load per run (default 10; --quick 2)")
    ap.add_argument("--rate", type=float, help="base request rate, req/s (default: the scenario's)")
    ap.add_argument("--seed", type=int, default=1, help="seed of arrivals, service times, lb (default 1)")
    ap.add_argument("--timeout", type=float, default=2.0,
                    help="client timeout, s: a later answer is an error (default 2)")
    ap.add_argument("--connections", type=int, default=512,
                    help="most client connections the load generator opens (default 512)")
    ap.add_argument("--quick", action="store_true", help="short smoke run (about 2 minutes)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each cell (default 1); with more, the spread is printed")
    ap.add_argument("--busy", nargs="?", const="both", choices=("both", "only"),
                    help="also (both) or only (only) run with one busy-loop process per core beside "
                         "each run")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs lb")
    ap.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxy (default 0)")
    ap.add_argument("--load-cpu", type=int, default=1,
                    help="CPU for the load generator and the backends (default 1)")
    ap.add_argument("--json", metavar="FILE", help="write every summary as JSON")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown too")
    ap.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    args = ap.parse_args(argv)
    names = list(scn.SCENARIOS) if args.scenario == "all" else \
        [s.strip() for s in args.scenario.split(",") if s.strip()]
    bad = []
    for s in names:
        try:
            scn.get(s)
        except ValueError:
            bad.append(s)
    if bad or not names:
        ap.error(f"--scenario: unknown {bad} (choose from {', '.join(scn.SCENARIOS)}, all, "
                 f"or fleet<seed>)")
    args.scenarios = names
    default = QUICK_POLICIES if args.quick else POLICIES
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()] \
        if args.policies else list(default)
    bad = [p for p in args.policies if p not in POLICIES]
    if bad or not args.policies:
        ap.error(f"--policies: unknown {bad} (choose from {', '.join(POLICIES)})")
    if args.duration is None:
        args.duration = 2.0 if args.quick else 10.0
    if not 1 <= args.duration <= 600:
        ap.error("--duration must be between 1 and 600 seconds")
    if args.rate is not None and not 1 <= args.rate <= 5000:
        ap.error("--rate must be between 1 and 5000 req/s (2 cores: keep it modest)")
    if not 1 <= args.repeat <= 20:
        ap.error("--repeat must be between 1 and 20")
    if args.timeout <= 0 or args.connections < 1:
        ap.error("--timeout must be > 0 and --connections >= 1")
    return args


def check_tools(args) -> dict:
    needed = ["taskset"] + [p for p in ("nginx", "haproxy") if p in args.policies]
    missing = [t for t in needed if not which(t)]
    if missing:
        raise UsageError("missing tool(s): " + ", ".join(missing)
                         + " (Debian: apt-get install nginx haproxy util-linux; "
                           "or leave them out with --policies)")
    problem = cpu_pair_problem(args.proxy_cpu, args.load_cpu)
    if problem:
        raise UsageError(problem)
    if any(p in LB_POLICIES for p in args.policies):
        p = subprocess.run([args.python, "-c", "import lb, workers, uvloop, httptools"],
                           capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
        if p.returncode != 0:
            raise UsageError(f"--python {args.python} cannot import lb:\n{p.stderr.strip()}")
    return {
        "nproc": os.cpu_count(), "kernel": platform.release(),
        "python": sys.version.split()[0],
        "nginx": tool_version([which("nginx"), "-v"]) if which("nginx") else "",
        "haproxy": tool_version([which("haproxy"), "-v"]) if which("haproxy") else "",
    }


def command_line(args) -> str:
    parts = ["python bench/quality.py"]
    if args.quick:
        parts.append("--quick")
    if args.scenarios != list(scn.SCENARIOS):
        parts.append("--scenario " + ",".join(args.scenarios))
    default = QUICK_POLICIES if args.quick else POLICIES
    if list(args.policies) != list(default):
        parts.append("--policies " + ",".join(args.policies))
    if args.duration != (2.0 if args.quick else 10.0):
        parts.append(f"--duration {args.duration:g}")
    if args.rate is not None:
        parts.append(f"--rate {args.rate:g}")
    if args.seed != 1:
        parts.append(f"--seed {args.seed}")
    if args.timeout != 2.0:
        parts.append(f"--timeout {args.timeout:g}")
    if args.busy:
        parts.append(f"--busy {args.busy}")
    if args.repeat > 1:
        parts.append(f"--repeat {args.repeat}")
    return " ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        meta = check_tools(args)
    except UsageError as exc:
        print(f"quality: {exc}", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {args.load_cpu})  # the load generator shares the backends' CPU
    modes = {None: (False,), "both": (False, True), "only": (True,)}[args.busy]
    runs = len(args.scenarios) * len(args.policies) * len(modes) * args.repeat
    print(f"{command_line(args)}\n{runs} runs of {args.duration:g} s; proxy on CPU {args.proxy_cpu}, "
          f"load + backends on CPU {args.load_cpu}; {meta['nginx']}; {meta['haproxy']}")
    sys.stdout.flush()
    out = {"command": command_line(args), "meta": meta, "duration": args.duration,
           "seed": args.seed, "timeout": args.timeout, "scenarios": {}}
    tmp_root = tempfile.mkdtemp(prefix="lb-quality-")
    os.chmod(tmp_root, 0o755)
    interrupted = False

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    t_all = time.monotonic()
    status = 0
    try:
        for name in args.scenarios:
            sc = scn.get(name)
            rate = args.rate or sc.rate
            print(f"\n== {name}: {sc.description}; {rate:g} req/s (Poisson), "
                  f"{args.duration:g} s per run")
            for spec in sc.backends[:report.MAX_SHARE_COLUMNS]:
                print(f"   {spec.describe()}")
            if len(sc.backends) > report.MAX_SHARE_COLUMNS:
                print(f"   ... {len(sc.backends) - report.MAX_SHARE_COLUMNS} more, "
                      f"to {sc.backends[-1].describe()}")
            if sc.instances > 1:
                print(f"   {sc.instances} proxies of each policy share these backends")
            sys.stdout.flush()
            rows = []
            for busy in modes:
                # repetitions interleaved, so that a noisy spell of the host
                # falls on every policy alike
                for k in range(args.repeat):
                    for policy in args.policies:
                        try:
                            row = run_one(sc, policy, args, tmp_root, busy)
                        except BenchError as exc:
                            print(f"   {policy}{' busy' if busy else ''}: FAILED: {exc}", file=sys.stderr)
                            status = 1
                            continue
                        if args.repeat > 1:
                            row.run = k + 1  # type: ignore[attr-defined]
                            row.policy += f" #{k + 1}"
                        rows.append(row)
            print(report.table(sc, rows))
            if args.repeat > 1:
                print(spread(rows))
            schedule = scn.run_schedule(sc, args.duration, args.rate, args.seed)
            print(scn.floor_line(scn.floor(sc, schedule, args.duration, args.seed)))
            if args.markdown:
                print()
                print(report.table(sc, rows, markdown=True))
            late = {r.policy: r.late for r in rows if getattr(r, "late", 0)}  # type: ignore[attr-defined]
            if late:
                print(f"(requests sent > 1 ms late by the load generator: {late})")
            sys.stdout.flush()
            out["scenarios"][name] = {
                "description": sc.description, "rate": rate,
                "backends": [spec.describe() for spec in sc.backends],
                "rows": [dict(r.as_dict(), late_sends=getattr(r, "late", 0),
                              connections=getattr(r, "connections", 0)) for r in rows],
            }
    except KeyboardInterrupt:
        interrupted = True
        print("\nquality: interrupted", file=sys.stderr)
        status = 1
    finally:
        if not args.keep_temp:
            shutil.rmtree(tmp_root, ignore_errors=True)
        else:
            print(f"configs and logs kept in {tmp_root}")
    out["wall_seconds"] = time.monotonic() - t_all
    print(f"\n{out['wall_seconds']:.0f} s in all")
    if args.json and not interrupted:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
