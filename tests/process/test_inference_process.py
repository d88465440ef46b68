"""`python -m inference` as a real process: stats in over ZeroMQ PUB, tables out
through the Clone subscriber, control, kill -9 and restart, bad inputs,
traces and the continuous-learning swap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from inference import traces
from tests import synthetic
from lb.core.clone import Publisher, Subscriber
from lb.core.config import encode as encode_config
from lb.core.messages import (TOPIC_CONTROL, TOPIC_STATS, TOPIC_TABLE, Control, encode, endpoints,
                         table_decoder)
from tests.models import constant_model


class Proc:
    """One inference process with its stderr events collected."""

    def __init__(self, runtime: str, cfg=None, stdin: bytes | None = None) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "inference", "--runtime", runtime],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.p.stdin.write(stdin if stdin is not None else encode_config(cfg))
        self.p.stdin.close()
        self.events: list[dict] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        for line in self.p.stderr:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "raw", "line": line.decode(errors="replace")})

    def ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        b = self.p.stdout.read(1)
        assert b == b"R", f"no readiness byte (got {b!r}); events: {self.events}"
        assert time.monotonic() < deadline

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == event]

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(5)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()


class Feeder:
    """A synthetic worker sending WorkerStats over a real PUB socket, routed by the tables it receives."""

    def __init__(self, runtime: str, cfg, sample: float = 0.2) -> None:
        self.ctx = zmq.Context()
        ep = endpoints(runtime)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.connect(ep["stats_inference"])
        self.tables = Subscriber(self.ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE, table_decoder.decode)
        self.worker = synthetic.SyntheticWorker(synthetic.DEMO_LIKE, cfg.class_names, rate=300,
                                                sample=sample, start=time.time())

    def run(self, seconds: float, until=None) -> bool:
        deadline = time.monotonic() + seconds
        next_report = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_report:
                self.pub.send_multipart((TOPIC_STATS, encode(self.worker.report(time.time()))))
                next_report = time.monotonic() + 0.1
            if self.tables.poll():
                self.worker.table = self.tables.state
            if until is not None and until():
                return True
            time.sleep(0.01)
        return until is None

    def close(self) -> None:
        self.pub.close()
        self.tables.close()
        self.ctx.term()


@pytest.fixture
def runtime(tmp_path_factory):
    # short path: ipc socket names are limited to ~100 bytes
    import tempfile

    d = tempfile.mkdtemp(prefix="lbi-", dir="/tmp")
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def test_tables_heartbeat_control_and_sigterm(runtime):
    cfg = synthetic.config()
    proc = Proc(runtime, cfg)
    feeder = Feeder(runtime, cfg)
    ctx = zmq.Context()
    ep = endpoints(runtime)
    try:
        proc.ready()
        assert feeder.run(6.0, lambda: feeder.tables.state is not None and feeder.tables.state.mode == "learned")
        t = feeder.tables.state
        assert t.model_version and t.reason == "" and t.tick_seconds > 0
        assert np.allclose(np.array(t.weights).sum(axis=1), 1.0)
        first_seq = t.seq
        feeder.run(0.5)
        assert feeder.tables.seq >= first_seq + 3  # ~one table per 0.1 s
        # heartbeats from inside the loop
        os.set_blocking(proc.p.stdout.fileno(), False)
        said, deadline = b"", time.monotonic() + 5  # one a second
        while b"H" not in said and time.monotonic() < deadline:
            said += proc.p.stdout.read() or b""
            time.sleep(0.05)
        assert b"H" in said, said
        # the admin's control state: a drained backend gets weight 0
        control = Publisher(ctx, ep["control"], ep["control_snapshot"], TOPIC_CONTROL)
        epoch, seq = control.next_version()
        control.publish(encode(Control(epoch=epoch, seq=seq, ts=time.time(), drained=["fast"])))

        def fast_drained() -> bool:
            control.serve_snapshots()
            s = feeder.tables.state
            return all(row[s.backends.index("fast")] == 0 for row in s.weights)

        assert feeder.run(5.0, fast_drained)
        control.close()
        t0 = time.monotonic()
        assert proc.stop() == 0
        assert time.monotonic() - t0 < 2.0
        modes = [(e["mode"], e["reason"]) for e in proc.named("policy_mode")]
        assert modes[:2] == [("fallback", "warming_up"), ("learned", "")]
    finally:
        feeder.close()
        ctx.term()
        proc.stop()


def test_killed_process_replaced_subscriber_moves_to_new_epoch(runtime):
    cfg = synthetic.config()
    proc = Proc(runtime, cfg)
    feeder = Feeder(runtime, cfg)
    proc2 = None
    try:
        proc.ready()
        assert feeder.run(5.0, lambda: feeder.tables.seq >= 5)
        old_epoch = feeder.tables.epoch
        proc.p.send_signal(signal.SIGKILL)
        proc.p.wait(5)
        assert proc.p.returncode == -signal.SIGKILL
        proc2 = Proc(runtime, cfg)
        proc2.ready()
        assert feeder.run(5.0, lambda: feeder.tables.epoch not in (0, old_epoch))
        assert feeder.tables.state.seq < 100
        # the fresh process warms up on the live stats and routes again
        assert feeder.run(5.0, lambda: feeder.tables.state.mode == "learned")
        assert proc2.stop() == 0
    finally:
        feeder.close()
        proc.stop()
        if proc2 is not None:
            proc2.stop()


def test_bad_model_file_keeps_publishing_fallback_tables(runtime, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    cfg = synthetic.config(model=str(bad))
    proc = Proc(runtime, cfg)
    feeder = Feeder(runtime, cfg)
    try:
        proc.ready()
        assert feeder.run(5.0, lambda: feeder.tables.seq >= 3)
        t = feeder.tables.state
        assert (t.mode, t.reason, t.model_version) == ("fallback", "model_error", "")
        assert np.allclose(np.array(t.weights).sum(axis=1), 1.0)
        errors = proc.named("model_error")
        assert len(errors) == 1 and errors[0]["error"].startswith(str(bad) + ": not a valid ONNX model")
        assert proc.p.poll() is None  # still running
        assert proc.stop() == 0
    finally:
        feeder.close()
        proc.stop()


def test_bad_config_on_stdin_exits_3(runtime):
    proc = Proc(runtime, stdin=b"\x93not a config")
    assert proc.p.wait(10) == 3
    proc.t.join(5)
    boot = proc.named("boot_failed")
    assert len(boot) == 1 and "config on stdin" in boot[0]["error"]
    assert proc.p.stdout.read() == b""  # never said R


def test_traces_are_written(runtime, tmp_path):
    out = tmp_path / "traces"
    # (the synthetic worker routes by the tables' weights: a backend priced out
    # is reached only through the exploration share, 2% here, as every backend
    # must show in 2.5 s of traces)
    cfg = synthetic.config(traces=str(out), exploration=0.02)
    proc = Proc(runtime, cfg)
    feeder = Feeder(runtime, cfg, sample=1.0)
    try:
        proc.ready()
        feeder.run(2.5)
        assert proc.stop() == 0  # flushes what it holds
    finally:
        feeder.close()
        proc.stop()
    data = traces.read([str(out)])
    n = len(data["latency"])
    assert n > 200
    assert set(data["backend"]) == {b.name for b in cfg.backends}
    assert set(data["cls"]) <= set(cfg.class_names)
    assert (np.diff(data["ts"]) >= 0).all()


def test_continuous_learning_swaps_out_a_bad_live_model(runtime, tmp_path):
    bad = constant_model(tmp_path / "bad.onnx", 3.0, 0.5, version="bad-1")
    # (the records are every request: the twin reads the rate from them and trace_sample)
    cfg = synthetic.config(model=bad, retrain_interval=1.0, trace_sample=1.0)
    proc = Proc(runtime, cfg)
    feeder = Feeder(runtime, cfg, sample=1.0)
    try:
        proc.ready()
        assert feeder.run(3.0, lambda: feeder.tables.state is not None)
        assert feeder.tables.state.model_version == "bad-1"
        assert feeder.run(40.0, lambda: feeder.tables.state.model_version.startswith("mlp-"))
        # (the table can arrive before the reader thread has the log line)
        assert feeder.run(5.0, lambda: proc.named("model_swapped"))
        swapped = proc.named("model_swapped")
        assert len(swapped) == 1 and swapped[0]["previous"] == "bad-1"
        assert swapped[0]["challenger_score"] < swapped[0]["live_score"]
        assert swapped[0]["cpu_s"] > 0  # what the refit cost, from the child's own rusage
        # judged by routing too: a simulated copy of the fleet routed with each model
        assert swapped[0]["twin_requests"] > 1000
        assert swapped[0]["twin_challenger_p99_ms"] <= swapped[0]["twin_live_p99_ms"] * 1.1
        assert swapped[0]["version"] == feeder.tables.state.model_version
        assert proc.stop() == 0
        # the adopted model was kept for the next inference process (reload, crash)
        from inference import adopted
        from inference.model import Model

        kept = adopted.find(runtime, adopted.base_model(bad, ""))
        assert kept is not None and Model.load(kept).version == swapped[0]["version"]
    finally:
        feeder.close()
        proc.stop()
