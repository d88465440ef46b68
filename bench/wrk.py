"""wrk for bench/proxy_bench.py: the workloads, the command line, the output parsed.

`WORKLOADS` is what each request of a run is (--workload), `check_workload`
sends one through a proxy and checks the answer's framing, `run_wrk` runs
wrk pinned to a CPU in the mode `WRK_MODE` says (scheme, Connection: close,
path, headers, Lua script; set once per benchmark) and `parse_wrk` reads
its report: requests, req/s, latency percentiles, errors.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import TYPE_CHECKING

from procs import BenchError, which  # bench/procs.py

if TYPE_CHECKING:
    from servers import ProxyInfo  # bench/servers.py

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_LAT_RE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)


def parse_wrk(out: str) -> dict:
    m_req = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),", out)
    m_rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m_req or not m_rps:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    lat = {f"p{p}": float(v) * _UNITS[u] for p, v, u in _LAT_RE.findall(out)}
    if "p99" not in lat:
        raise BenchError(f"no 99% latency in wrk output:\n{out}")
    errors = 0
    m_sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m_sock:
        errors += sum(int(x) for x in m_sock.groups())
    m_non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(m_non2xx.group(1)) if m_non2xx else 0
    return {
        "requests": int(m_req.group(1)),
        "wrk_seconds": float(m_req.group(2)) * _UNITS[m_req.group(3)],
        "rps": float(m_rps.group(1)),
        "p50_s": lat.get("p50"),
        "p90_s": lat.get("p90"),
        "p99_s": lat["p99"],
        "socket_errors": errors,
        "non_2xx": non2xx,
    }


WRK_MODE = {"scheme": "http", "close": False, "path": "/", "headers": [], "script": None}
# (set once by bench() from --tls / --handshakes / --workload)

# --workload: what each request is.  (path, extra request headers, body size)
WORKLOADS = {
    "get": ("/", [], 0),  # the backends' own 100-byte answer
    "post1k": ("/", ["Content-Type: application/octet-stream"], 1024),
    "get16k": ("/files/16k", [], 0),
    "get1m": ("/files/1m", [], 0),
    "chunked16k": ("/chunked/text16k", [], 0),  # 16 KiB, chunked
    "gzip16k": ("/files/text16k", ["Accept-Encoding: gzip"], 0),  # chunked, about 5 KiB
}


def check_workload(info: ProxyInfo, workload: str) -> str:
    """One request of the workload through the proxy: the answer it must give."""
    import http.client
    import ssl

    path, headers, body = WORKLOADS[workload]
    if info.tls:
        conn = http.client.HTTPSConnection("127.0.0.1", info.port, timeout=5,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection("127.0.0.1", info.port, timeout=5)
    try:
        hdrs = dict(h.split(": ", 1) for h in headers)
        conn.request("POST" if body else "GET", path, body=b"x" * body if body else None, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        te = resp.getheader("Transfer-Encoding", "")
        ce = resp.getheader("Content-Encoding", "")
    finally:
        conn.close()
    if resp.status != 200:
        raise BenchError(f"{info.name}: {workload} answered {resp.status} {data[:60]!r}")
    want = {"gzip16k": ("gzip", "chunked"), "chunked16k": ("", "chunked")}.get(workload, ("", ""))
    if (ce, te) != want:
        raise BenchError(f"{info.name}: {workload} answered Content-Encoding {ce!r}, "
                         f"Transfer-Encoding {te!r} (want {want})")
    framing = "chunked" if te else f"{len(data)} bytes"
    return f"{workload}: 200, {framing}{', gzip' if ce else ''}"


def wrk_post_script(tmp: str, size: int) -> str:
    path = os.path.join(tmp, "post.lua")
    with open(path, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = string.rep("x", {size})\n')
    return path


def run_wrk(port: int, duration: int, connections: int, threads: int, cpu: int) -> tuple[dict, str]:
    argv = ["taskset", "-c", str(cpu), which("wrk"), "-t", str(threads), "-c", str(connections),
            "-d", f"{duration}s", "--timeout", "5s", "--latency"]
    if WRK_MODE["close"]:
        argv += ["-H", "Connection: close"]
    for h in WRK_MODE["headers"]:
        argv += ["-H", h]
    if WRK_MODE["script"]:
        argv += ["-s", WRK_MODE["script"]]
    argv.append(f"{WRK_MODE['scheme']}://127.0.0.1:{port}{WRK_MODE['path']}")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration + 30}s") from None
    if p.returncode != 0:
        raise BenchError(f"wrk exited with {p.returncode}:\n{p.stdout}{p.stderr}")
    return parse_wrk(p.stdout), p.stdout
