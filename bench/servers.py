"""The servers a proxy benchmark runs: backends, nginx, HAProxy and lb.

Each is started from a template in bench/templates/ (`render`) into a
temporary directory, on free ports (`free_ports`), pinned to a CPU
(bench/cpus.py), and stopped with its children at the end (`Proc`,
bench/procs.py).  Used by bench/proxy_bench.py; `free_ports`, `render` and
`nginx_temp_paths` by the other benchmarks too.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field

from cpus import pin  # bench/cpus.py
from procs import REPO_ROOT, BenchError, Proc, http_get, wait_http, wait_log_line, which  # bench/procs.py

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
PROXIES = ("nginx", "haproxy", "lb")


# --------------------------------------------------------------------------
# ports and templates
# --------------------------------------------------------------------------


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
