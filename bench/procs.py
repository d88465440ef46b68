"""Running the benchmarks' processes: Proc, waiting for readiness, the errors.

`Proc` starts a command in its own process group with its output in a log
file, and stops the whole group; `wait_http` and `wait_log_line` wait until
a started process is ready (and fail with its log's tail if it died first).
`BenchError` and `UsageError` are the failures the benchmark scripts turn
into exit codes 1 and 2.  Used by bench/servers.py and by the benchmarks
that start processes (proxy_bench.py, quality.py, fleet_bench.py,
capacity_bench.py).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def tool_version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    for line in (p.stdout + "\n" + p.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


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
