"""Shared pieces for the admin tests: a real admin process on a socket bound
here, and the ZeroMQ peers it talks to (workers' stats, the supervisor's
status, the inference process's tables), all real sockets; and `admin_call`,
the admin API of an `lb run` started by a test.

tests/process/test_admin_harness.py checks the harness itself.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import zmq

from lb.core.clone import Publisher, Subscriber
from lb.core.config import from_dict, encode as encode_config
from lb.core.messages import (
    N_BUCKETS,
    TOPIC_CONTROL,
    TOPIC_STATS,
    TOPIC_STATUS,
    TOPIC_TABLE,
    BackendStats,
    SupervisorStatus,
    Table,
    WorkerStats,
    bucket_index,
    control_decoder,
    encode,
    endpoints,
)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token"


def base_config(**over) -> dict:
    cfg = {
        "strategy": "ml",
        "admin": {"token": TOKEN},
        "backends": [
            {"address": "127.0.0.1:9001", "name": "fast"},
            {"address": "127.0.0.1:9002", "name": "slow", "weight": 2},
            {"address": "127.0.0.1:9003", "name": "flaky"},
        ],
        "classes": [
            {"name": "upload", "methods": ["POST", "PUT"], "min_body": "64KiB"},
            {"name": "api", "path_prefix": "/api/"},
        ],
    }
    cfg.update(over)
    return cfg


class AdminProc:
    """`python -m lb.admin` on a listening socket made here, as the supervisor does."""

    def __init__(self, cfg: dict | None = None, runtime: str | None = None, env: dict | None = None) -> None:
        self.own_runtime = runtime is None
        self.runtime = runtime or tempfile.mkdtemp(prefix="lba-", dir="/tmp")
        self.cfg = from_dict(cfg or base_config())
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        full_env = dict(os.environ)
        full_env.pop("LB_ADMIN_TOKEN", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lb.admin", "--runtime", self.runtime, "--fd", str(self.sock.fileno())],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(self.sock.fileno(),), env=full_env,
        )
        self.proc.stdin.write(encode_config(self.cfg))
        self.proc.stdin.close()
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.first = self.read_stdout(1, 15)
        assert self.first == b"R", f"no readiness byte: {self.first!r}\n" + "\n".join(self.stderr)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip())

    def read_stdout(self, n: int, timeout: float) -> bytes:
        out = b""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while len(out) < n and time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            chunk = os.read(fd, n - len(out))
            if not chunk:
                break
            out += chunk
        return out

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: object = None, token: str | None = None,
                raw_body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, object]:
        """(status, headers, parsed JSON or raw bytes)."""
        data = raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, hdrs, raw = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, raw = e.code, dict(e.headers), e.read()
        ctype = hdrs.get("Content-Type", "")
        return status, hdrs, (json.loads(raw) if ctype.startswith("application/json") else raw)

    def get(self, path: str):
        return self.request("GET", path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        if self.own_runtime:
            shutil.rmtree(self.runtime, ignore_errors=True)


class FakeWorker:
    """Cumulative counters as one worker would report them, advanced by a
    simple traffic model: per backend a request rate, a latency and an error share."""

    def __init__(self, pid: int, slot: int, backends: list[tuple[str, int]], classes: list[str],
                 seed: int = 1) -> None:
        self.pid, self.slot = pid, slot
        self.classes = classes
        self.rng = random.Random(seed)
        self.seq = 0
        self.requests = 0
        self.mode = ("ml", "learned", "")
        self.table_seq = 0
        self.b = {
            name: BackendStats(name=name, weight=w, requests=0, responses=[0] * 6, connect_errors=0,
                               timeouts=0, retries=0, resets=0, inflight=0, idle=0, ewma=0.0,
                               class_responses=[0] * len(classes), class_errors=[0] * len(classes),
                               class_latency_sum=[0.0] * len(classes),
                               class_latency=[[0] * N_BUCKETS for _ in classes])
            for name, w in backends
        }

    def advance(self, traffic: dict[str, tuple[int, float, float]]) -> None:
        """traffic: backend -> (requests in this step, mean latency s, error share)."""
        for name, (n, lat, err) in traffic.items():
            b = self.b[name]
            for _ in range(n):
                c = self.rng.randrange(len(self.classes))
                seconds = self.rng.expovariate(1 / lat)
                failed = self.rng.random() < err
                b.requests += 1
                self.requests += 1
                b.responses[5 if failed else 2] += 1
                b.class_responses[c] += 1
                if failed:
                    b.class_errors[c] += 1
                b.class_latency_sum[c] += seconds
                b.class_latency[c][bucket_index(seconds)] += 1
            b.inflight = self.rng.randrange(0, 4)
            b.idle = 3
            b.ewma = lat

    def message(self) -> WorkerStats:
        self.seq += 1
        strategy, mode, reason = self.mode
        return WorkerStats(slot=self.slot, pid=self.pid, generation=1, seq=self.seq, ts=time.time(),
                           classes=self.classes, backends=list(self.b.values()), connections=5,
                           accepted=10, requests=self.requests, rejected=1, timeouts=0, no_backend=2,
                           shed=0, limited=3, strategy=strategy, mode=mode, mode_reason=reason,
                           table_seq=self.table_seq, table_age=0.05)


class Feeder:
    """Plays the workers, the supervisor and the inference process."""

    def __init__(self, runtime: str, backends: list[tuple[str, int]], classes: list[str]) -> None:
        ep = endpoints(runtime)
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.connect(ep["stats_admin"])
        self.tables = Publisher(self.ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE)
        self.control = Subscriber(self.ctx, ep["control"], ep["control_snapshot"], TOPIC_CONTROL,
                                  control_decoder.decode)
        self.backends = backends
        self.classes = classes
        self.workers = [FakeWorker(40000 + i, i, backends, classes, seed=i + 1) for i in range(2)]
        self.traffic = {"fast": (6, 0.004, 0.0), "slow": (3, 0.040, 0.0), "flaky": (2, 0.010, 0.3)}
        self.status = dict(workers_expected=2, workers_ready=2, worker_restarts=1, reloads=2,
                           reloads_failed=1, inference_up=True, inference_restarts=0)
        self.table_mode = ("learned", "")
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Feeder":
        self.thread.start()
        return self

    def table(self) -> Table:
        epoch, seq = self.tables.next_version()
        names = [n for n, _ in self.backends]
        weights = [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.7, 0.2, 0.1]][: len(self.classes)]
        # what the engine publishes beside the weights: predicted latency and the
        # cost the picks are priced with (here 1% of errors predicted for flaky)
        latency = [[0.002, 0.004, 0.008][: len(names)] for _ in self.classes]
        cost = [[0.002, 0.004, 0.008 / 0.99 ** 8][: len(names)] for _ in self.classes]
        return Table(epoch=epoch, seq=seq, ts=time.time(), interval=0.1, model_version="test-model-7",
                     mode=self.table_mode[0], reason=self.table_mode[1], backends=names,
                     classes=self.classes, weights=weights, latency=latency, cost=cost, exploration=0.02,
                     prediction_error=0.25, tick_seconds=0.0015,
                     error_weight=[0.5, 0.002, 0.97][: len(names)])

    def send_stats(self) -> None:
        with self.lock:
            for w in self.workers:
                w.advance(self.traffic)
                self.pub.send_multipart((TOPIC_STATS, encode(w.message())))

    def _run(self) -> None:
        last_status = 0.0
        while not self.stopping:
            self.send_stats()
            t = self.table()
            self.tables.publish(encode(t))
            self.tables.serve_snapshots()
            self.control.poll()
            if time.monotonic() - last_status > 0.5:
                last_status = time.monotonic()
                with self.lock:
                    st = SupervisorStatus(ts=time.time(), pid=os.getpid(), generation=3, config_path="/x.toml",
                                          strategy="ml", **self.status)
                self.pub.send_multipart((TOPIC_STATUS, encode(st)))
            time.sleep(0.1)

    def stop(self) -> None:
        self.stopping = True
        if self.thread.is_alive():
            self.thread.join(2)
        self.pub.close()
        self.tables.close()
        self.control.close()
        self.ctx.term()


def wait_until(fn, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last: {last!r})")


def metric_samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value, from Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


RUN_TOKEN = "lb-run-token"  # the admin token tests give `lb run` (LB_ADMIN_TOKEN)


def admin_call(lb, method: str, path: str, body: object = None, token: str | None = RUN_TOKEN):
    """(status, JSON body or raw bytes) of one admin API call to an `lb run` (tests.conftest.LBProc)."""
    from tests.rawhttp import get

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None if body is None else json.dumps(body).encode()
    status, _, raw = get(lb.admin_port, path, method=method, body=data, headers=headers)
    return status, json.loads(raw) if raw.startswith(b"{") else raw
