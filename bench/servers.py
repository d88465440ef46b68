"""The processes a proxy benchmark needs: backends, nginx, HAProxy and lb.

Each is started from a template in bench/templates/ into a temporary
directory, pinned to a CPU, and stopped (with its children) at the end.
Used by bench/proxy_bench.py.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
PROXIES = ("nginx", "haproxy", "lb")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin"



class BenchError(Exception):
    """A failure worth one clear line (exit code 1)."""


class UsageError(Exception):
    """A missing tool or an unusable option (exit code 2)."""


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def render(template_name: str, **values) -> str:
    with open(os.path.join(TEMPLATE_DIR, template_name), encoding="utf-8") as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace("@" + key + "@", str(value))
    leftover = re.search(r"@[A-Z_]+@", text)
    if leftover:
        raise BenchError(f"template {template_name}: unfilled placeholder {leftover.group(0)}")
    return text


def tool_version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    for line in (p.stdout + "\n" + p.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


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


def http_get(port: int, timeout: float = 2.0, tls: bool = False) -> tuple[int, bytes]:
    if tls:
        import ssl

        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def fmt_latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f}ms"
    return f"{seconds:.2f}s"


# --------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------


class Proc:
    """A started process in its own process group; output goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: str, cwd: str | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise BenchError(f"{name}: cannot start {argv[0]}: {exc}") from None
        self.pid = self.popen.pid  # also the process group id

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in lines[-n:])

    def _group_exists(self) -> bool:
        try:
            os.killpg(self.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after `grace` s."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.popen.poll() is not None and not self._group_exists():
                    break
                time.sleep(0.05)
            else:
                continue
            break
        try:
            self.popen.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def wait_http(proc: Proc, port: int, timeout: float, what: str, tls: bool = False) -> None:
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(
                f"{what} exited with code {proc.popen.returncode} during startup; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        try:
            status, _ = http_get(port, timeout=1.0, tls=tls)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{what} not answering on 127.0.0.1:{port} after {timeout:.0f}s ({last})")


def wait_log_line(proc: Proc, needle: str, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(proc.log_path, "rb") as f:
                for raw in f:
                    line = raw.decode("utf-8", "replace")
                    if needle in line:
                        return line
        except OSError:
            pass
        if not proc.alive():
            raise BenchError(
                f"{what} exited with code {proc.popen.returncode} during startup; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        time.sleep(0.1)
    raise BenchError(f"{what}: no {needle!r} in its log after {timeout:.0f}s:\n{proc.log_tail()}")


# --------------------------------------------------------------------------
# the servers
# --------------------------------------------------------------------------


def backend_body(i: int, size: int = 100) -> str:
    head = f"hello from backend {i} "
    return head + "x" * (size - len(head) - 1) + "\n"


def nginx_temp_paths(prefix: str) -> str:
    names = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    return "\n".join(
        f"    {n}_temp_path {os.path.join(prefix, 'tmp', n)};" for n in names
    )


# The files the backends serve under /files/ (proxy_bench --workload).
FILE_SIZES = {"16k": 16 * 1024, "1m": 1024 * 1024}
TEXT_SIZE = 16 * 1024  # "text16k": words, compressible about 3x (gzip workload)


def write_files(www: str) -> None:
    import random

    os.makedirs(www, mode=0o755)
    rng = random.Random(7)
    for name, size in FILE_SIZES.items():
        with open(os.path.join(www, name), "wb") as f:
            f.write(rng.randbytes(size))
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    text = ""
    while len(text) < TEXT_SIZE:
        text += rng.choice(words) + (" " if rng.random() < 0.9 else "\n")
    with open(os.path.join(www, "text16k"), "w") as f:
        f.write(text[:TEXT_SIZE])
    for name in os.listdir(www):
        os.chmod(os.path.join(www, name), 0o644)


class Backends:
    """One nginx, one worker, two ports, each returning its own fixed body."""

    def __init__(self, tmp: str, ports: list[int], cpu: int):
        self.ports = ports
        self.bodies = [backend_body(i + 1).encode() for i in range(len(ports))]
        self.prefix = os.path.join(tmp, "backend")
        os.makedirs(os.path.join(self.prefix, "tmp"), mode=0o755)
        self.www = os.path.join(self.prefix, "www")
        write_files(self.www)
        servers = "\n".join(
            render("backend_server.conf", PORT=port, BODY=body.decode().rstrip("\n") + "\\n", WWW=self.www)
            for port, body in zip(ports, self.bodies)
        )
        conf = os.path.join(self.prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(
                render(
                    "nginx_backend.conf",
                    PREFIX=self.prefix,
                    TEMP_PATHS=nginx_temp_paths(self.prefix),
                    SERVERS=servers,
                )
            )
        argv = ["taskset", "-c", str(cpu), which("nginx"), "-p", self.prefix + "/", "-c", conf,
                "-e", os.path.join(self.prefix, "error.log")]
        self.proc = Proc("backend nginx", argv, os.path.join(self.prefix, "stdout.log"))
        self.cpu = cpu

    def wait_ready(self) -> None:
        for port, body in zip(self.ports, self.bodies):
            wait_http(self.proc, port, 15, "backend nginx")
            status, got = http_get(port)
            if status != 200 or got != body:
                raise BenchError(f"backend 127.0.0.1:{port} answered {status} {got[:60]!r}")
        import psutil

        procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(True)
        for p in procs:
            pin(p.pid, self.cpu)
        self.pids = [p.pid for p in procs]


@dataclass
class ProxyInfo:
    name: str
    port: int
    proc: Proc
    measured_pid: int = 0
    other_pids: list[int] = field(default_factory=list)
    tls: bool = False  # `port` speaks HTTPS


def start_nginx(tmp: str, port: int, backend_ports: list[int], cpu: int, tls=None) -> ProxyInfo:
    prefix = os.path.join(tmp, "nginx")
    os.makedirs(os.path.join(prefix, "tmp"), mode=0o755)
    upstream = "\n".join(f"        server 127.0.0.1:{p};" for p in backend_ports)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            render(
                "nginx_proxy.conf",
                PREFIX=prefix,
                TEMP_PATHS=nginx_temp_paths(prefix),
                UPSTREAM_SERVERS=upstream,
                PORT=port,
                SSL=" ssl" if tls else "",
                TLS_SETTINGS=tls.nginx_server() if tls else "",
            )
        )
    argv = ["taskset", "-c", str(cpu), which("nginx"), "-p", prefix + "/", "-c", conf,
            "-e", os.path.join(prefix, "error.log")]
    return ProxyInfo("nginx", port, Proc("nginx", argv, os.path.join(prefix, "stdout.log")), tls=bool(tls))


def start_haproxy(tmp: str, port: int, backend_ports: list[int], cpu: int, tls=None) -> ProxyInfo:
    prefix = os.path.join(tmp, "haproxy")
    os.makedirs(prefix)
    servers = "\n".join(
        f"    server s{i + 1} 127.0.0.1:{p}" for i, p in enumerate(backend_ports)
    )
    conf = os.path.join(prefix, "haproxy.cfg")
    with open(conf, "w") as f:
        f.write(render("haproxy.cfg", PORT=port, SERVERS=servers, BIND_TLS=tls.haproxy_bind() if tls else "",
                       GLOBAL_TLS=tls.haproxy_global() if tls else ""))
    check = subprocess.run([which("haproxy"), "-c", "-f", conf], capture_output=True, text=True,
                           timeout=20)
    if check.returncode != 0:
        raise BenchError(f"haproxy -c rejected {conf}:\n{check.stdout}{check.stderr}")
    argv = ["taskset", "-c", str(cpu), which("haproxy"), "-db", "-f", conf]
    return ProxyInfo("haproxy", port, Proc("haproxy", argv, os.path.join(prefix, "haproxy.log")),
                     tls=bool(tls))


def start_lb(tmp: str, port: int, admin_port: int, backend_ports: list[int], cpu: int,
             python: str, tls=None, plain_port: int = 0) -> ProxyInfo:
    """lb on `port`; with `tls`, its HTTPS listener is `port` and the plain one `plain_port`."""
    prefix = os.path.join(tmp, "lb")
    os.makedirs(prefix)
    backends = "\n".join(
        f'[[backends]]\naddress = "127.0.0.1:{p}"\n' for p in backend_ports
    )
    conf = os.path.join(prefix, "lb.toml")
    with open(conf, "w") as f:
        f.write(render("lb.toml", PORT=plain_port if tls else port, ADMIN_PORT=admin_port,
                       BACKENDS=backends, TLS=tls.lb_section(port) if tls else ""))
    argv = ["taskset", "-c", str(cpu), python, "-m", "lb", "run", "-c", conf, "-w", "1"]
    return ProxyInfo("lb", port, Proc("lb", argv, os.path.join(prefix, "lb.log"), cwd=REPO_ROOT),
                     tls=bool(tls))


def resolve_workers(info: ProxyInfo, cpu: int) -> None:
    """Find the process that does the proxying, pin it, and remember the rest."""
    import psutil

    root = psutil.Process(info.proc.pid)
    if info.name == "nginx":
        deadline = time.monotonic() + 10
        workers = []
        while time.monotonic() < deadline:
            workers = [c for c in root.children() if "worker process" in " ".join(c.cmdline())]
            if workers:
                break
            time.sleep(0.1)
        if len(workers) != 1:
            raise BenchError(f"nginx: expected 1 worker process, found {len(workers)}")
        info.measured_pid = workers[0].pid
    elif info.name == "haproxy":
        info.measured_pid = root.pid  # -db without -W: one process, the one that proxies
    else:
        line = wait_log_line(info.proc, '"event":"worker_ready"', 60, "lb")
        workers = [
            c for c in root.children(recursive=True)
            if "workers" in c.cmdline() and "--slot" in c.cmdline()
        ]
        if len(workers) != 1:
            raise BenchError(f"lb: expected 1 worker child of pid {root.pid}, found {len(workers)}")
        info.measured_pid = workers[0].pid
        m = re.search(r'"pid":(\d+)', line)
        if m and int(m.group(1)) != info.measured_pid:
            raise BenchError(
                f"lb: worker_ready came from pid {m.group(1)}, worker child is {info.measured_pid}"
            )
    info.other_pids = [p.pid for p in [root] + root.children(recursive=True)
                       if p.pid != info.measured_pid]
    for pid in [info.measured_pid] + info.other_pids:
        pin(pid, cpu)


def sanity_check(info: ProxyInfo, bodies: list[bytes]) -> str:
    seen = set()
    for _ in range(4):
        status, body = http_get(info.port, tls=info.tls)
        if status != 200 or body not in bodies:
            raise BenchError(f"{info.name}: GET / answered {status} {body[:60]!r}")
        seen.add(bodies.index(body))
    return f"{len(seen)}/{len(bodies)} backends seen in 4 requests"


