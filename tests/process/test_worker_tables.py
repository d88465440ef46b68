"""A worker process and the state it gets over ZeroMQ: routing tables, the
operator's control state, and the stats it reports.

The worker runs for real (`python -m workers`, its own listening socket); the
test plays the inference and admin processes with `lb.core.clone.Publisher`s bound
on the worker's runtime directory, and reads its `WorkerStats`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import pytest
import zmq

from lb.core import config as cfgmod
from lb.core import messages as m
from lb.core.clone import Publisher
from tests.conftest import ROOT, free_port
from tests.rawhttp import get


class Harness:
    """One worker, plus fake inference (tables) and admin (control) publishers."""

    def __init__(self, backends, *, strategy="ml", classes=(), publish=True, trace_sample=0.0):
        self.dir = tempfile.mkdtemp(prefix="lbt-")
        self.ep = m.endpoints(self.dir)
        self.ctx = zmq.Context()
        self.names = [b.name for b in backends]
        self.table: m.Table | None = None  # what the publisher thread sends, refreshed
        self.control: m.Control | None = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.raw_once: list[m.Table] = []  # sent once, as is (seq included)
        self.raw_sent = 0  # how many of those the publisher thread has sent
        self.stats_sub = self.ctx.socket(zmq.SUB)
        self.stats_sub.setsockopt(zmq.SUBSCRIBE, m.TOPIC_STATS)
        self.stats_sub.bind(self.ep["stats_inference"])
        self.tables = Publisher(self.ctx, self.ep["tables"], self.ep["tables_snapshot"], m.TOPIC_TABLE)
        self.controls = Publisher(self.ctx, self.ep["control"], self.ep["control_snapshot"],
                                  m.TOPIC_CONTROL)
        self.publishing = publish
        self.thread = threading.Thread(target=self._publish_loop, daemon=True)
        self.thread.start()
        cfg = cfgmod.from_dict({
            "listen": "127.0.0.1:1",
            "strategy": strategy,
            "backends": [{"address": b.address, "name": b.name} for b in backends],
            "classes": list(classes),
            # guard_share 0: every ml pick by the table (the guard's control share is
            # tests/unit/test_guard.py's), so a row's routing is exact here
            "learning": {"stats_interval": 0.05, "trace_sample": trace_sample, "guard_share": 0.0},
            "balancer": {"seed": 7},
        })
        self.class_names = cfg.class_names
        self.port = free_port()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(128)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "--fd", str(self.sock.fileno()), "--slot", "0",
             "--runtime", self.dir, "--generation", "1"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(self.sock.fileno(),),
        )
        self.proc.stdin.write(cfgmod.encode(cfg))
        self.proc.stdin.close()
        assert self.proc.stdout.read(1) == b"R"

    def make_table(self, weights: dict[str, dict[str, float]], *, mode="learned", reason="",
                   interval=0.1) -> m.Table:
        classes = list(weights)
        return m.Table(
            epoch=0, seq=0, ts=0.0, interval=interval, model_version="test", mode=mode,
            reason=reason, backends=self.names, classes=classes,
            weights=[[weights[c].get(n, 0.0) for n in self.names] for c in classes],
        )

    def _publish_loop(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                table, control, once = self.table, self.control, self.raw_once
                self.raw_once = []
            for t in once:
                self.tables.latest = m.encode(t)
                self.tables.pub.send_multipart((m.TOPIC_TABLE, self.tables.latest))
            if once:
                with self.lock:
                    self.raw_sent += len(once)
            if table is not None and self.publishing:
                epoch, seq = self.tables.next_version()
                table.epoch, table.seq, table.ts = epoch, seq, time.time()
                self.tables.publish(m.encode(table))
            if control is not None:
                epoch, seq = self.controls.next_version()
                control.epoch, control.seq, control.ts = epoch, seq, time.time()
                self.controls.publish(m.encode(control))
            self.tables.serve_snapshots()
            self.controls.serve_snapshots()
            time.sleep(0.02)

    def set_table(self, table) -> None:
        with self.lock:
            self.table = table

    def set_control(self, **kw) -> None:
        with self.lock:
            self.control = m.Control(epoch=0, seq=0, ts=0.0, **kw)

    def stats(self, until=lambda s: True, timeout: float = 5.0) -> m.WorkerStats:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.stats_sub.poll(100):
                last = m.stats_decoder.decode(self.stats_sub.recv_multipart()[1])
                if until(last):
                    return last
        raise AssertionError(f"no matching stats in {timeout} s; last: {last}")

    def send_once(self, table: m.Table) -> None:
        """Publish `table` as is, once; return when the worker has had it.

        A version the worker keeps shows in its stats (table_seq); one it drops
        leaves no trace.  So: wait until the publisher thread has sent it, then
        for stats the worker made after that (its event loop, which takes tables
        from a socket as soon as it is readable, has turned since)."""
        with self.lock:
            target = self.raw_sent + 1
            self.raw_once = [table]
        deadline = time.monotonic() + 5
        while True:
            with self.lock:
                if self.raw_sent >= target:
                    break
            assert time.monotonic() < deadline, "the publisher thread did not send the table"
            time.sleep(0.005)
        sent = time.time()
        first = self.stats(lambda s: s.ts > sent)
        self.stats(lambda s: s.seq > first.seq)

    def available(self, name: str, yes: bool) -> m.WorkerStats:
        """Stats once the worker routes to backend `name` (yes) or not."""
        return self.stats(lambda s: any(b.name == name and b.unavailable != yes for b in s.backends))

    def hits(self, n: int, path: str = "/") -> Counter:
        seen = Counter()
        for _ in range(n):  # one at a time: in-flight counts stay 0
            status, headers, _ = get(self.port, path)
            assert status == 200
            seen[headers["X-Backend"]] += 1
        return seen

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stop.set()
        self.thread.join(5)
        self.tables.close()
        self.controls.close()
        self.stats_sub.close()
        self.ctx.term()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def two(backend_factory):
    return [backend_factory("a"), backend_factory("b")]


@pytest.fixture
def harness_factory():
    made = []

    def make(*a, **kw):
        h = Harness(*a, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


HEAVY = [{"name": "heavy", "path_prefix": "/heavy"}]


def test_each_request_class_is_routed_by_its_own_row(two, harness_factory):
    h = harness_factory(two, classes=HEAVY)
    h.set_table(h.make_table({"default": {"a": 1.0}, "heavy": {"b": 1.0}}))
    h.stats(lambda s: s.mode == "learned")
    assert h.hits(20, "/") == Counter(a=20)
    assert h.hits(20, "/heavy/report") == Counter(b=20)
    s = h.stats(lambda s: sum(sum(b.class_responses) for b in s.backends) >= 40)
    by_name = {b.name: b for b in s.backends}
    assert by_name["a"].class_responses == [20, 0]
    assert by_name["b"].class_responses == [0, 20]
    assert sum(by_name["b"].class_latency[1]) == 20
    assert s.strategy == "ml" and s.mode_reason == "" and s.table_seq > 0


def test_a_worker_started_after_the_table_gets_it_as_a_snapshot(two, harness_factory):
    # The publisher sends one table and then nothing: only the snapshot can deliver it.
    h = harness_factory(two, publish=False)
    table = h.make_table({"default": {"b": 1.0}}, interval=30.0)
    table.epoch, table.seq, table.ts = 99, 5, time.time()
    h.tables.latest = m.encode(table)  # what a snapshot request is answered with
    s = h.stats(lambda s: s.table_seq == 5)
    assert s.mode == "learned"
    assert h.hits(10) == Counter(b=10)


def test_an_older_table_never_replaces_a_newer_one(two, harness_factory):
    h = harness_factory(two, publish=False)
    new = h.make_table({"default": {"a": 1.0}}, interval=30.0)
    new.epoch, new.seq, new.ts = 7, 10, time.time()
    old = h.make_table({"default": {"b": 1.0}}, interval=30.0)
    old.epoch, old.seq, old.ts = 7, 9, time.time()
    with h.lock:
        h.raw_once = [new]
    h.stats(lambda s: s.table_seq == 10)
    h.send_once(old)
    s = h.stats()
    assert s.table_seq == 10
    assert h.hits(10) == Counter(a=10)
    # A new epoch (the inference process restarted) is taken even with a lower seq.
    fresh = h.make_table({"default": {"b": 1.0}}, interval=30.0)
    fresh.epoch, fresh.seq, fresh.ts = 8, 1, time.time()
    with h.lock:
        h.raw_once = [fresh]
    h.stats(lambda s: s.table_seq == 1)
    assert h.hits(10) == Counter(b=10)


def test_a_stale_table_falls_back_to_p2c_ewma(two, harness_factory):
    h = harness_factory(two)
    h.set_table(h.make_table({"default": {"a": 1.0}}, interval=0.1))
    h.stats(lambda s: s.mode == "learned")
    assert h.hits(3, "/slow/40") == Counter(a=3)  # the table sends even slow requests to a
    h.publishing = False  # the inference process stops publishing
    s = h.stats(lambda s: s.mode == "fallback")
    assert s.mode_reason == "stale"
    # p2c_ewma now prefers b, whose latency estimate is lower; the table never would.
    assert h.hits(10)["b"] >= 9
    h.publishing = True
    h.stats(lambda s: s.mode == "learned")


def test_the_tables_own_fallback_and_its_reason_reach_the_worker(two, harness_factory):
    h = harness_factory(two)
    h.set_table(h.make_table({"default": {"a": 1.0}}, mode="fallback", reason="low_confidence"))
    s = h.stats(lambda s: s.table_seq > 0 and s.mode == "fallback")
    assert s.mode_reason == "low_confidence"
    assert h.hits(1, "/slow/40") == Counter(a=1)  # a tie: p2c takes the first
    assert h.hits(10)["b"] >= 9  # then the faster estimate, whatever the table says


def test_without_any_table_the_ml_strategy_routes_by_p2c_ewma(two, harness_factory):
    h = harness_factory(two, publish=False)
    s = h.stats()
    assert (s.mode, s.mode_reason) == ("fallback", "no_table")
    assert h.hits(1, "/slow/40") == Counter(a=1)
    assert h.hits(10)["b"] >= 9


def test_operator_drain_and_pinned_strategy_apply_without_restart(two, harness_factory):
    h = harness_factory(two, strategy="round_robin")
    assert h.hits(10) == Counter(a=5, b=5)
    h.set_control(drained=["a"])
    h.available("a", False)
    assert h.hits(10) == Counter(b=10)
    h.set_control(drained=[], pinned_strategy="least_connections")
    s = h.stats(lambda s: s.strategy == "least_connections")
    assert s.strategy == "least_connections"
    seen = h.hits(10)
    assert seen["a"] > 0 and seen["b"] > 0
    h.set_control(down=["b"])  # active health checks say b is down
    h.stats(lambda s: s.strategy == "round_robin")  # unpinned: back to the config's
    h.available("b", False)
    assert h.hits(10) == Counter(a=10)


def test_sampled_traces_carry_the_table_they_were_routed_by(two, harness_factory):
    h = harness_factory(two, trace_sample=1.0)
    h.set_table(h.make_table({"default": {"a": 0.5, "b": 0.5}}, interval=1.0))
    h.stats(lambda s: s.mode == "learned")
    h.hits(30)
    traces = []
    deadline = time.monotonic() + 5
    while len(traces) < 30 and time.monotonic() < deadline:
        traces += h.stats().traces
    assert len(traces) >= 30
    assert all(t.table_seq > 0 and t.ok and t.cls == 0 and t.backend in (0, 1) for t in traces)
    assert all(0 < t.latency < 1 for t in traces)


def test_a_trace_is_stamped_with_the_table_that_routed_it_not_a_later_one(servers, harness_factory):
    # a new table every ~20 ms (the harness publishes continuously) and answers
    # that take 0.4 s: some 20 tables come while a request is in flight
    slow = servers("slow", delay=0.4)
    h = harness_factory([slow], trace_sample=1.0)
    h.set_table(h.make_table({"default": {"slow": 1.0}}, interval=1.0))
    h.stats(lambda s: s.mode == "learned")
    before = h.stats().table_seq  # the worker holds this one or a newer one at dispatch
    status, _, _ = get(h.port, "/")
    assert status == 200
    after = h.stats(lambda s: s.table_seq > before + 10).table_seq
    traces = []
    deadline = time.monotonic() + 5
    while not traces and time.monotonic() < deadline:
        traces += h.stats().traces
    assert len(traces) == 1 and traces[0].latency >= 0.4
    # the table current when the request left (not the one current when its answer came)
    assert before <= traces[0].table_seq < after - 10, (before, traces[0].table_seq, after)
