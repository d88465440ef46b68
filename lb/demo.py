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
p50/p99 latency and errors, plus the totals.  The header says whether lb's
workers use the C fast path (read from their `worker_ready` log lines: lb's
own log is not shown); `--compare` says under its table where the errors come
from.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

from lb.core.boot import python_argv
from lb.core.config import STRATEGIES, Learning, Outlier
from lb.demo_backends import SIMULATED, free_port
from lb.demo_load import Load, percentile

WORKERS = 2  # lb's workers in the demo


async def _fetch_json(port: int, path: str) -> dict | None:
    """GET a JSON document from the admin server (None if it is not there yet)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 2)
        head, _, body = data.partition(b"\r\n\r\n")
        return json.loads(body) if head.startswith(b"HTTP/1.1 200") else None
    except (OSError, asyncio.TimeoutError, ValueError):
        return None
    finally:
        writer.close()


class View:
    """The terminal view: per-backend rows from the load's own measurements,
    weights and the policy mode from the admin API."""

    def __init__(self, admin_port: int) -> None:
        self.admin_port = admin_port
        self.route: dict | None = None
        self.task: asyncio.Task | None = None

    def tick(self, load: Load, elapsed: float) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._refresh())
        self.print(load, elapsed)

    async def _refresh(self) -> None:
        route = await _fetch_json(self.admin_port, "/api/route")
        if route is not None:
            self.route = route

    def weights(self) -> dict[str, float]:
        table = (self.route or {}).get("table") or {}
        return (table.get("weights") or {}).get("default", {})

    def policy(self) -> str:
        r = self.route
        if not r:
            return "policy: (waiting for the admin API)"
        if r.get("strategy") != "ml":
            return f"policy: {r.get('strategy')}"
        table = r.get("table") or {}
        line = f"policy: ml, {r.get('mode')}"
        if r.get("reason"):
            line += f" ({r['reason']})"
        if table:
            line += f", model {table.get('model_version')}, table #{table.get('seq')}"
        return line

    def print(self, load: Load, elapsed: float) -> None:
        rows: dict[str, list] = {}
        for backend, latency, ok in load.window:
            rows.setdefault(backend, []).append((latency, ok))
        n = max(1, len(load.window))
        weights = self.weights()
        print(f"\n t={elapsed:5.1f}s  {len(load.window)} req/s  total={load.total}  "
              f"errors={load.errors}   {self.policy()}")
        print(f"   {'backend':<12}{'share':>7}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'weight':>8}")
        for name in sorted(set(rows) | set(weights)):
            lat = sorted(x[0] for x in rows.get(name, []))
            errs = sum(1 for x in rows.get(name, []) if not x[1])
            w = f"{weights[name]:8.2f}" if name in weights else f"{'-':>8}"
            print(f"   {name:<12}{len(lat) / n * 100:6.1f}%{percentile(lat, .5) * 1e3:9.1f}"
                  f"{percentile(lat, .99) * 1e3:9.1f}{errs:8d}{w}")
        sys.stdout.flush()


def _port_or_free(port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            return free_port()


class LbLog(threading.Thread):
    """lb's log (JSON lines on its stderr), read while the demo runs: the demo
    shows what a user needs from it (whether the workers use the C fast path,
    from their `worker_ready` lines) and, when lb does not start, its last lines."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.tail: collections.deque[str] = collections.deque(maxlen=15)
        self.fastpath: list[bool] = []  # one per worker_ready
        self.ended = False
        self.cond = threading.Condition()

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode(errors="replace").rstrip()
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            with self.cond:
                self.tail.append(line)
                if isinstance(event, dict) and event.get("event") == "worker_ready":
                    self.fastpath.append(event.get("fastpath") is True)
                    self.cond.notify_all()
        with self.cond:
            self.ended = True  # lb exited (or closed its stderr)
            self.cond.notify_all()

    def wait_workers(self, count: int, deadline: float) -> bool:
        """Whether `count` workers said they are up before `deadline` (False at
        once when lb's log ends: it exited)."""
        with self.cond:
            while len(self.fastpath) < count and not self.ended:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return len(self.fastpath) >= count

    def last_lines(self) -> str:
        with self.cond:
            return "".join(f"\n  | {line}" for line in self.tail)


def fastpath_state(flags: list[bool]) -> str:
    """Whether lb's workers use the C fast path (workers/_fastpath.c), and if
    not, why that matters and what to do."""
    if not flags:
        return "C fast path: unknown (no worker said worker_ready)"
    if all(flags):
        return f"C fast path: on in all {len(flags)} workers"
    if any(flags):
        return f"C fast path: on in only {sum(flags)} of {len(flags)} workers"
    if os.environ.get("LB_NO_FASTPATH", "") not in ("", "0"):
        why = "switched off by LB_NO_FASTPATH"
    else:
        why = "workers/_fastpath.c is not compiled in this install (reinstall with a C compiler)"
    return f"C fast path: OFF in all {len(flags)} workers, {why}: the pure Python path, about half the speed"


class Stack:
    """The simulated backends and one `lb run`, started together, stopped together."""

    def __init__(self, port: int, admin_port: int, strategy: str, offset: float = 0.0) -> None:
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="lb-demo-")
        self.port = port
        self.admin_port = admin_port
        self.strategy = strategy
        self.offset = offset
        self.log: LbLog | None = None
        self.address_in_use = False  # lb exited at start because a port was taken

    def start(self) -> str | None:
        """Start everything; an error message if something did not come up."""
        ports = [free_port() for _ in SIMULATED]
        # Started as lb's children are (lb/core/boot.py): this lb's code, whatever the
        # current directory holds (a source checkout next to an installed lb).
        self.procs.append(subprocess.Popen(
            [*python_argv("lb.demo_backends"), "--offset", str(self.offset), *map(str, ports)],
            stdout=subprocess.PIPE))
        if self.procs[0].stdout.readline().strip() != b"ready":
            return "simulated backends failed to start"
        cfg = os.path.join(self.tmp.name, "demo.toml")
        lines = [f'listen = "127.0.0.1:{self.port}"', f'strategy = "{self.strategy}"',
                 "[admin]", f'listen = "127.0.0.1:{self.admin_port}"',
                 "[balancer]", "seed = 1",
                 "[[classes]]", 'name = "report"', 'path_prefix = "/api/report"']
        for spec, port in zip(SIMULATED, ports):
            lines += ["[[backends]]", f'name = "{spec.name}"', f'address = "127.0.0.1:{port}"']
        with open(cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        lb = subprocess.Popen([*python_argv("lb"), "run", "-c", cfg, "-w", str(WORKERS)],
                              stderr=subprocess.PIPE)
        self.procs.append(lb)
        self.log = LbLog(lb.stderr)
        self.log.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if lb.poll() is not None:
                return self._exited()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            return f"lb did not start listening within 20 s; its log:{self.log.last_lines()}"
        # (Something else may have answered on the port: lb's own workers say they are up.)
        if not self.log.wait_workers(WORKERS, deadline):
            if lb.poll() is not None or self.log.ended:
                try:
                    lb.wait(5)
                except subprocess.TimeoutExpired:
                    pass  # (stop() ends it)
                return self._exited()
            return f"lb's workers did not all start within 20 s; its log:{self.log.last_lines()}"
        # Load starts once every worker is up (the admin API's readiness), so the
        # first seconds measure the backends, not lb's own start-up.
        while time.monotonic() < deadline:
            if asyncio.run(_fetch_json(self.admin_port, "/api/health")) is not None:
                break
            time.sleep(0.2)
        return None

    def _exited(self) -> str:
        self.log.join(2)
        self.address_in_use = "Address already in use" in self.log.last_lines()
        return (f"lb failed to start (are ports {self.port} and {self.admin_port} free? use --port); "
                f"its log:{self.log.last_lines()}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.tmp.cleanup()


def run_demo(args) -> int:
    if args.compare:
        return run_compare(args)
    admin_port = _port_or_free(args.admin_port)
    stack = Stack(args.port, admin_port, args.strategy)
    try:
        err = stack.start()
        if err:
            print(f"lb demo: {err}", file=sys.stderr)
            return 1
        print(f"lb demo: lb on http://127.0.0.1:{args.port}/ strategy={args.strategy}, "
              f"{len(SIMULATED)} simulated backends "
              f"({', '.join(s.describe() for s in SIMULATED)}), "
              f"{args.rate:.0f} req/s for {args.duration:.0f}s. Ctrl-C stops.")
        print(f"lb demo: dashboard http://127.0.0.1:{admin_port}/  "
              f"(metrics: http://127.0.0.1:{admin_port}/metrics)")
        print(f"lb demo: {fastpath_state(stack.log.fastpath)}")
        sys.stdout.flush()
        load = Load(args.port, args.rate)
        view = View(admin_port)
        view.route = asyncio.run(_fetch_json(admin_port, "/api/route"))
        try:
            asyncio.run(load.run(args.duration, view.tick))
        except KeyboardInterrupt:
            pass
        print(f"\nlb demo: {load.total} requests, {load.errors} errors "
              f"({load.errors / max(1, load.total) * 100:.2f}%)")
        return 0
    finally:
        stack.stop()


WARMUP = 2.0  # seconds of each --compare run not counted (every strategy alike)
PORT_ATTEMPTS = 3  # starts of one --compare run on fresh ports when a port is taken


def run_compare(args) -> int:
    """The same seeded scenario under each strategy in turn, one table at the end."""
    duration = args.duration if args.duration_given else 12.0
    # The degrading backend slows down 10x from 10 s to 20 s of its 30 s cycle:
    # start each run 6 s into the cycle so every run sees the same slowdown.
    offset = 6.0
    results = []
    errors_from: dict[str, collections.Counter] = {}  # strategy -> failed requests by backend
    print(f"lb demo --compare: {len(STRATEGIES)} strategies x {duration:.0f}s at {args.rate:.0f} req/s, "
          f"same backends and load each time (first {WARMUP:.0f}s of each run not counted)")
    port, admin_port = args.port, args.admin_port
    for i, strategy in enumerate(STRATEGIES):
        stack, err = _start_stack(port, admin_port, strategy, offset)
        port, admin_port = stack.port, stack.admin_port
        try:
            if err:
                print(f"lb demo: {err}", file=sys.stderr)
                return 1
            if i == 0:
                print(f"lb demo --compare: {fastpath_state(stack.log.fastpath)}")
            load = Load(port, args.rate)
            load.record_after = WARMUP
            try:
                asyncio.run(load.run(duration, lambda *_: None))
            except KeyboardInterrupt:
                print("\nlb demo: interrupted")
                return 130
        finally:
            stack.stop()
        lat = sorted(x[1] for x in load.all)
        by_backend = collections.Counter(x[0] for x in load.all if not x[2])
        errors = sum(by_backend.values())
        errors_from[strategy] = by_backend
        results.append((strategy, len(lat), percentile(lat, .5), percentile(lat, .99),
                        percentile(lat, .999), errors / max(1, len(lat))))
        print(f"  {strategy:<22} done: {len(lat)} requests, {errors} errors")
        sys.stdout.flush()
    print(f"\n  {'strategy':<22}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'errors':>9}")
    for strategy, n, p50, p99, p999, err in results:
        print(f"  {strategy:<22}{n:9d}{p50 * 1e3:9.1f}{p99 * 1e3:9.1f}{p999 * 1e3:10.1f}{err * 100:8.2f}%")
    print(errors_note(errors_from))
    return 0


def _start_stack(port: int, admin_port: int, strategy: str, offset: float) -> tuple[Stack, str | None]:
    """One --compare run's stack, started.  Nothing outside connects during a
    comparison, so a port taken since the last run (by a listener, or as the
    local end of an outgoing connection) is replaced by a free one."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        stack = Stack(port, _port_or_free(admin_port), strategy, offset=offset)
        try:
            err = stack.start()
        except BaseException:
            stack.stop()
            raise
        if not err or not stack.address_in_use or attempt == PORT_ATTEMPTS:
            break
        stack.stop()
        port, admin_port = free_port(), free_port()
        print(f"lb demo --compare: a port was in use; going on with {port} (admin {admin_port})",
              file=sys.stderr)
    return stack, err


def errors_note(errors_from: dict[str, collections.Counter]) -> str:
    """Lines under the --compare table: where the errors come from.

    The fail-fast backend answers 503 to most requests.  Every strategy sends
    it requests until passive outlier detection ejects it, and again each time
    it returns; ml reaches it less often (its table gives it almost no weight),
    so it is ejected later, and its exploration share keeps probing it while
    it is not.  Counted from the X-Backend header of each failed answer."""
    failing = next(s for s in SIMULATED if s.fail_rate)
    outlier, explore = Outlier(), Learning().exploration
    total = sum(sum(c.values()) for c in errors_from.values())
    from_failing = sum(c[failing.name] for c in errors_from.values())
    if from_failing == total:
        head = f"All {total} errors are" if total else "No errors; any would be"
    else:
        head = f"{from_failing} of {total} errors are"
    text = (f"{head} 503s from '{failing.name}' (fails {failing.fail_rate:.0%}, fast). Every strategy reaches it "
            f"until passive ejection takes it out ({outlier.consecutive_failures} failures in a row, for "
            f"{outlier.base_ejection:g} s, longer each time) and again after it returns")
    if "ml" in errors_from:
        text += (f"; ml also probes it with its exploration share: {explore:.1%} of its picks "
                 "(learning.exploration) may go to a backend not heard from for a second")
    text += "."
    if from_failing != total:
        text += (f" The other {total - from_failing} had no answer from a backend (no X-Backend header) "
                 "or came from another one.")
    return textwrap.fill(text, width=110, initial_indent="  ", subsequent_indent="  ")
