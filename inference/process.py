"""The inference process: `python -m inference --runtime DIR` (config msgpack on stdin).

Sockets (endpoints from `lb.core.messages.endpoints(DIR)`):
  * SUB bound on `stats_inference` (topic b"stats"): `WorkerStats` from every worker;
  * `lb.core.clone.Publisher` on `tables` / `tables_snapshot`: one `Table` per tick;
  * `lb.core.clone.Subscriber` on `control` / `control_snapshot`: the admin's
    `Control` (drained / down backends); the admin may be absent.

One loop: poll every socket with a timeout up to the next tick, drain the
stats, answer snapshot requests, apply control changes, and when due run one
tick of the `Engine` and publish its table.  `R` is written on fd 1 once the
sockets are bound, `H` every second from inside the loop.  SIGTERM/SIGINT
stop within one poll timeout (exit 0); SIGQUIT stops at once.  Exit code 3:
could not boot (bad config on stdin, socket already bound...).  A missing or
bad model does not stop the process: tables say `mode="fallback"`,
`reason="model_error"` and the workers route by their own load curves.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import msgspec
import zmq

from inference import adopted
from inference.engine import Engine
from inference.model import DEFAULT_MODEL, Model, ModelError
from inference.retrain import discard
from lb.core import config as cfgmod
from lb.core.clone import Publisher, Subscriber
from lb.core.fleet import compose
from lb.core.child import EXIT_BOOT, EXIT_OK, READY, BootError, Liveness, read_config, tell
from lb.core.log import log, reopen
from lb.core.messages import TOPIC_CONTROL, TOPIC_STATS, TOPIC_TABLE, control_decoder, encode, endpoints, stats_decoder

MAX_DRAIN = 10_000  # stats messages taken per loop iteration at most



def load_model(cfg: cfgmod.Config, runtime_dir: str = "") -> tuple[Model | None, str]:
    """The model to start from: the one continuous learning adopted for the
    configured base model, if one was kept (inference/adopted.py), else the
    configured one."""
    base = adopted.base_model(cfg.learning.model, DEFAULT_MODEL)
    kept = adopted.find(runtime_dir, base) if runtime_dir else None
    if kept is not None:
        try:
            model = Model.load(kept)
            log("model_restored", path=kept, version=model.version, base=base)
            return model, ""
        except ModelError as exc:
            log("model_restore_failed", error=str(exc))
    path = cfg.learning.model or DEFAULT_MODEL
    try:
        return Model.load(path), ""
    except ModelError as exc:
        return None, str(exc)


class InferenceProcess:
    def __init__(self, cfg: cfgmod.Config, runtime_dir: str) -> None:
        self.cfg = cfg
        self.runtime_dir = runtime_dir
        self.stop = False
        self.liveness = Liveness()
        self.ctx = zmq.Context.instance()
        ep = endpoints(runtime_dir)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 10_000)
        self.sub.setsockopt(zmq.SUBSCRIBE, TOPIC_STATS)
        self.sub.bind(ep["stats_inference"])
        self.pub = Publisher(self.ctx, ep["tables"], ep["tables_snapshot"], TOPIC_TABLE)
        self.control = Subscriber(self.ctx, ep["control"], ep["control_snapshot"], TOPIC_CONTROL,
                                  control_decoder.decode)
        model, err = load_model(cfg, runtime_dir)
        if model is None:
            log("model_error", error=err)
        else:
            log("model_loaded", path=model.path, version=model.version)
        self.engine = Engine(cfg, model, now=time.time(), model_error=err)
        self.writer = None
        if cfg.learning.traces:
            from inference.traces import TraceWriter

            self.writer = TraceWriter(cfg.learning.traces)
        self.retrainer = None
        if cfg.learning.retrain_interval > 0:
            from inference.retrain import Retrainer

            self.retrainer = Retrainer(runtime_dir, cfg.learning.retrain_interval, seed=cfg.balancer.seed,
                                       sample=cfg.learning.trace_sample,
                                       model_errors=cfg.learning.model_errors)
        self.bad_stats = 0
        self.trains = True  # False while another member of the fleet leads (Control.trains)
        self.fleet_seen = ""  # the last fleet model version considered
        self.fleet_candidate: tuple[Model, str] | None = None  # (model, member) awaiting its check
        self.candidates = 0  # fleet models copied to be judged (their files' names)

    def run(self) -> int:
        interval = self.cfg.learning.interval
        poller = zmq.Poller()
        for s in (self.sub, self.pub.router, self.control.sub, self.control.dealer):
            poller.register(s, zmq.POLLIN)
        tell(READY)
        log("inference_ready", backends=len(self.cfg.backends), classes=len(self.cfg.class_names),
            interval=interval, epoch=self.pub.epoch)
        next_tick = time.monotonic() + interval
        while not self.stop:
            timeout = max(0.0, min(next_tick, self.liveness.next) - time.monotonic())
            try:
                poller.poll(timeout * 1000)
            except zmq.ZMQError:
                pass  # interrupted by a signal
            self._drain_stats()
            self.pub.serve_snapshots()
            if self.control.poll():
                control = self.control.state
                if control.fleet_known:
                    backends = compose(self.cfg, control.discovered, control.added, control.shared)
                    if self.engine.set_fleet(backends, time.time()):
                        log("fleet_applied", backends=len(backends))
                self.engine.set_control(control)
                self.trains = control.trains
                if control.shared_version and control.shared_version != self.fleet_seen:
                    self.fleet_seen = control.shared_version
                    self._fleet_model(control)
            now = time.monotonic()
            if now >= next_tick:
                self._tick()
                next_tick += interval
                if next_tick < now:  # fell behind (machine busy): do not burst to catch up
                    next_tick = now + interval
            if now >= self.liveness.next and not self.liveness.beat(now):
                log("inference_orphaned")
                break
            if self.retrainer is not None:
                self._retrain_poll()
        return EXIT_OK

    def _drain_stats(self) -> None:
        for _ in range(MAX_DRAIN):
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.bad_stats += 1
                continue
            try:
                stats = stats_decoder.decode(frames[1])
            except msgspec.DecodeError:
                self.bad_stats += 1
                if self.bad_stats in (1, 100, 10_000):
                    log("bad_stats", count=self.bad_stats)
                continue
            self.engine.ingest(stats, time.time())

    def _tick(self) -> None:
        epoch, seq = self.pub.next_version()
        table = self.engine.tick(time.time(), epoch, seq)
        self.pub.publish(encode(table))
        for event, fields in self.engine.take_events():
            log(event, **fields)
        records = self.engine.take_records()
        if records is not None:
            if self.writer is not None:
                try:
                    self.writer.add(records)
                except OSError as exc:
                    log("trace_write_failed", error=str(exc))
                    self.writer = None
            if self.retrainer is not None:
                self.retrainer.add(records)

    def _retrain_poll(self) -> None:
        if self.fleet_candidate is not None and self.retrainer.idle() and self.retrainer.ready_to_check():
            (model, member), self.fleet_candidate = self.fleet_candidate, None
            self.retrainer.judge(self.engine.model, model, member)
        done = self.retrainer.poll(self.engine.model, may_start=self.trains)
        if done is None:
            return
        event, fields, model = done
        if model is not None:
            self._adopt(model, "fleet" if event == "model_adopted" else "retrain")
        log(event, **fields)

    def _adopt(self, model: Model, origin: str) -> None:
        """Route by `model` from now on, and keep it for the next inference
        process (reload, crash)."""
        try:
            path = adopted.save(self.runtime_dir, model.path,
                                adopted.base_model(self.cfg.learning.model, DEFAULT_MODEL), model.version,
                                origin)
            kept = Model.load(path)  # (the source file may be replaced: refer to the kept copy)
        except (OSError, ModelError) as exc:
            log("model_keep_failed", error=str(exc))
        else:
            discard(model.path)  # a refit's output, or a fleet model's copy: the kept copy replaces it
            model = kept
        self.engine.set_model(model)

    def _fleet_model(self, control) -> None:
        """The fleet's leader published a model: judge it like a refit of our own
        (inference/retrain.py) once there are records to judge it on.  It is
        judged from a copy of its own: the admin process writes the next
        version over the file it read."""
        live = self.engine.model
        if live is not None and live.version == control.shared_version:
            return  # ours (we lead), or adopted already
        if self.retrainer is None:
            log("fleet_model_ignored", version=control.shared_version, reason="learning.retrain_interval is 0")
            return
        self.candidates += 1
        path = os.path.join(self.runtime_dir, f"fleet-candidate-{os.getpid()}-{self.candidates}.onnx")
        try:
            with open(control.shared_model, "rb") as f:
                blob = f.read()
            model = Model.from_bytes(blob, path)
            if model.version != control.shared_version:
                return  # already replaced by a newer one: its own control message follows
            with open(path, "wb") as f:
                f.write(blob)
        except (OSError, ModelError) as exc:
            discard(path)
            error = str(exc) if isinstance(exc, ModelError) else f"{control.shared_model}: {exc.strerror or exc}"
            log("fleet_model_rejected", version=control.shared_version, member=control.shared_from, error=error)
            return
        if self.fleet_candidate is not None:  # a newer version replaces one not judged yet
            discard(self.fleet_candidate[0].path)
        self.fleet_candidate = (model, control.shared_from)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.flush()
            except OSError:
                pass
        if self.retrainer is not None:
            self.retrainer.stop()
        if self.fleet_candidate is not None:
            discard(self.fleet_candidate[0].path)
        self.sub.close()
        self.pub.close()
        self.control.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inference")
    ap.add_argument("--runtime", required=True, help="runtime directory (ipc endpoints)")
    args = ap.parse_args(argv)
    try:
        cfg = read_config()
    except BootError as exc:
        log("boot_failed", error=str(exc))
        return EXIT_BOOT
    proc: InferenceProcess | None = None
    stop_requested = False

    def on_stop(signum, frame) -> None:
        # Only a flag: raising here could unwind through onnxruntime while it
        # loads the model.  The loop (or the end of boot) sees it.
        nonlocal stop_requested
        stop_requested = True
        if proc is not None:
            proc.stop = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGQUIT, lambda s, f: os._exit(0))
    signal.signal(signal.SIGUSR1, lambda s, f: reopen() and log("logs_reopened"))
    try:
        proc = InferenceProcess(cfg, args.runtime)
    except zmq.ZMQError as exc:
        log("boot_failed", error=f"{args.runtime}: {exc}")
        return EXIT_BOOT
    if stop_requested:
        proc.close()
        log("inference_stopped")
        return EXIT_OK
    try:
        return proc.run()
    finally:
        proc.close()
        log("inference_stopped")
