"""The supervisor: owns the listening sockets, starts and replaces workers.

Signal handlers only enqueue; `run()` is one loop that dispatches each signal
to a `handle_<name>` method, reaps children and replaces the ones that died.
The listening sockets are created once, one SO_REUSEPORT socket per worker
slot, and handed to every generation of workers, so neither a reload nor a
respawn ever closes a listener (closing one would reset the connections
waiting in its accept queue).

Reload (SIGHUP, lb/supervisor/reload.py) starts the new generation first, waits until
every new worker says it is accepting, then asks the old generation to drain.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import tempfile
import time

import msgspec
import zmq

from lb.supervisor import children
from lb.core import config as cfgmod
from lb.core import messages, tickets
from lb.core.child import EXIT_BOOT  # a child that could not start
from lb.supervisor.children import ADMIN, INFERENCE, WORKER, Child
from lb.core.log import log, reopen
from lb.supervisor.reload import Reload
from lb.supervisor.sockets import admin_socket, ensure_free, listen_socket

MAX_BOOT_FAILURES = 5
STATUS_INTERVAL = 1.0  # seconds between two SupervisorStatus reports to the admin process
STATUS_FAST_INTERVAL = 0.05  # ... for STATUS_FAST_FOR seconds after an admin process says ready
STATUS_FAST_FOR = 2.0
AUX_BACKOFF_MAX = 30.0  # an auxiliary child that keeps dying at boot is retried at most this rarely


class SupervisorError(Exception):
    pass


class Supervisor:
    SIGNALS = ("SIGHUP", "SIGTERM", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGCHLD")

    def __init__(self, cfg: cfgmod.Config, path: str, workers: int | None = None) -> None:
        self.cfg = cfg
        self.path = path
        self.n_workers = workers or cfg.workers
        self.sockets: list[socket.socket] = []
        self.tls_sockets: list[socket.socket] = []  # the HTTPS listener's, one per slot
        # TLS session ticket keys of every worker derive from it (lb/core/tickets.py);
        # kept for the supervisor's life, so tickets survive reloads.
        self.ticket_secret = os.urandom(32).hex()
        self.children: dict[int, Child] = {}
        self.generation = 0
        self.blob = self.encode(cfg)
        self.queue: list[int] = []
        self.stopping = False
        self.stop_deadline = 0.0
        self.boot_failures = 0
        self.last_generation = 0
        self.reload = Reload(self)  # the reload pending, the generation retiring
        self.exit_code = 0
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.admin_sock: socket.socket | None = None
        self.runtime_dir = ""
        self.own_runtime_dir = False
        # auxiliary children: kind -> restart bookkeeping
        self.aux_due: dict[str, float] = {}  # kind -> monotonic time to (re)start it
        self.aux_failures: dict[str, int] = {INFERENCE: 0, ADMIN: 0}
        self.worker_restarts = 0
        self.inference_restarts = 0
        self.reloads = 0
        self.reloads_failed = 0
        self.zmq_ctx: zmq.Context | None = None
        self.status_pub: zmq.Socket | None = None
        self.next_status = 0.0
        self.status_fast_until = 0.0  # send statuses often until then (a new admin process)

    # -- setup ----------------------------------------------------------------

    def encode(self, cfg: cfgmod.Config) -> bytes:
        """The config as children get it: `workers` is the real count (-w wins),
        which workers use to take their share of instance-wide limits."""
        return cfgmod.encode(msgspec.structs.replace(cfg, workers=self.n_workers))

    def bind(self) -> None:
        ensure_free(self.cfg.listen)
        if self.cfg.tls.listen:
            ensure_free(self.cfg.tls.listen)
        if self.cfg.admin.enabled:
            self.admin_sock = admin_socket(self.cfg.admin.listen)
        self.sockets = [listen_socket(self.cfg.listen, self.cfg.backlog) for _ in range(self.n_workers)]
        if self.cfg.tls.listen:
            self.tls_sockets = [listen_socket(self.cfg.tls.listen, self.cfg.backlog)
                                for _ in range(self.n_workers)]

    def make_runtime_dir(self) -> None:
        if self.cfg.runtime_dir:
            self.runtime_dir = self.cfg.runtime_dir
            try:
                os.makedirs(self.runtime_dir, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise SupervisorError(f"runtime_dir {self.runtime_dir}: {exc.strerror}") from None
        else:
            self.runtime_dir = tempfile.mkdtemp(prefix="lb-")
            self.own_runtime_dir = True
        self.zmq_ctx = zmq.Context()
        pub = self.status_pub = self.zmq_ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 4)
        # The admin process binds; reconnect soon after it (re)starts, so that the
        # status sent when it says ready is not dropped for want of a connection.
        pub.setsockopt(zmq.RECONNECT_IVL, 20)
        pub.connect(messages.endpoints(self.runtime_dir)["stats_admin"])

    def _signal(self, signum, _frame) -> None:
        self.queue.append(signum)
        try:
            os.write(self.wake_w, b"!")
        except OSError:
            pass

    def spawn(self, slot: int, generation: int, blob: bytes | None = None) -> Child:
        """Start a worker for `slot`, configured with `blob` (default: the running config)."""
        child = children.start(WORKER, slot, generation, self.blob if blob is None else blob,
                               self.runtime_dir, self.sockets[slot],
                               self.tls_sockets[slot] if self.tls_sockets else None,
                               {tickets.SECRET_ENV: self.ticket_secret})
        self.children[child.pid] = child
        return child

    def spawn_aux(self, kind: str) -> None:
        """Start the inference or admin process (with the running config)."""
        self.aux_due.pop(kind, None)
        try:
            child = children.start(kind, 0, self.generation, self.blob, self.runtime_dir,
                                   self.admin_sock if kind == ADMIN else None)
        except OSError as exc:
            log("child_start_failed", kind=kind, error=str(exc))
            self.aux_due[kind] = time.monotonic() + 1.0
            return
        self.children[child.pid] = child

    def aux(self, kind: str) -> Child | None:
        for c in self.children.values():
            if c.kind == kind and not c.stopping:
                return c
        return None

    # -- main loop ------------------------------------------------------------

    def run(self) -> int:
        self.bind()
        self.make_runtime_dir()
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._signal)
        log("supervisor_start", listen=self.cfg.listen, workers=self.n_workers,
            strategy=self.cfg.strategy, backends=len(self.cfg.backends), config=self.path)
        self.generation = self.last_generation = 1
        for slot in range(self.n_workers):
            self.spawn(slot, self.generation)
        self.spawn_aux(INFERENCE)
        if self.admin_sock is not None:
            self.spawn_aux(ADMIN)
        while True:
            self._wait()
            while self.queue:
                signum = self.queue.pop(0)
                name = signal.Signals(signum).name[3:].lower()
                getattr(self, f"handle_{name}")()
            self.reap()
            self.reload.check()
            if not self.stopping:
                self.check_heartbeats()
                self.start_due()
                self.send_status()
            if self.stopping:
                if not self.children:
                    break
                if time.monotonic() > self.stop_deadline:
                    self.kill_all(signal.SIGKILL)
        self.cleanup()
        log("supervisor_exit", code=self.exit_code)
        return self.exit_code

    def cleanup(self) -> None:
        for s in self.sockets + self.tls_sockets:
            s.close()
        if self.admin_sock is not None:
            self.admin_sock.close()
        if self.status_pub is not None:
            self.status_pub.close()
            self.zmq_ctx.term()
        if self.own_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _wait(self) -> None:
        fds = [self.wake_r] + [c.fd for c in self.children.values()]
        try:
            fast = time.monotonic() < self.status_fast_until
            readable, _, _ = select.select(fds, [], [], STATUS_FAST_INTERVAL if fast else 0.25)
        except InterruptedError:
            return
        by_fd = {c.fd: c for c in self.children.values()}
        for fd in readable:
            if fd == self.wake_r:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            child = by_fd.get(fd)
            if child is None:
                continue
            was_ready = child.ready
            child.read_signals()
            if child.ready and not was_ready:
                if child.kind == WORKER:
                    self.boot_failures = 0
                else:
                    log("child_ready", kind=child.kind, pid=child.pid)
                    if child.kind == ADMIN:
                        # A new admin process answers /api/health from our status: send it
                        # often until its subscription has surely reached our PUB socket.
                        self.next_status = 0.0
                        self.status_fast_until = time.monotonic() + STATUS_FAST_FOR

    def check_heartbeats(self) -> None:
        """Kill a child whose event loop is stuck (no byte for timeouts.heartbeat),
        or an auxiliary child that never became ready; reap() replaces it."""
        now = time.monotonic()
        for c in self.children.values():
            if c.stopping or c.killed:
                continue
            stuck = c.ready and c.silent_for(now) > self.cfg.timeouts.heartbeat
            slow_boot = c.kind != WORKER and not c.ready and now - c.started > children.BOOT_TIMEOUT
            if stuck or slow_boot:
                log("child_stuck", kind=c.kind, slot=c.slot, pid=c.pid,
                    silent=round(c.silent_for(now), 1), ready=c.ready)
                c.killed = True
                c.send(signal.SIGKILL)

    def start_due(self) -> None:
        now = time.monotonic()
        for kind, due in list(self.aux_due.items()):
            if now >= due and self.aux(kind) is None:
                self.spawn_aux(kind)

    def send_status(self) -> None:
        now = time.monotonic()
        if now < self.next_status or self.status_pub is None:
            return
        self.next_status = now + (STATUS_FAST_INTERVAL if now < self.status_fast_until else STATUS_INTERVAL)
        workers = [c for c in self.children.values()
                   if c.kind == WORKER and c.generation == self.generation and not c.stopping]
        inf = self.aux(INFERENCE)
        status = messages.SupervisorStatus(
            ts=time.time(), pid=os.getpid(), generation=self.generation,
            workers_expected=self.n_workers, workers_ready=sum(c.ready for c in workers),
            worker_restarts=self.worker_restarts, reloads=self.reloads,
            reloads_failed=self.reloads_failed, inference_up=bool(inf and inf.ready),
            inference_restarts=self.inference_restarts, config_path=self.path,
            strategy=self.cfg.strategy, config=self.blob, runtime_dir=self.runtime_dir,
        )
        try:
            self.status_pub.send_multipart((messages.TOPIC_STATUS, messages.encode(status)),
                                           zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            child.proc.returncode = os.waitstatus_to_exitcode(status)
            child.proc.stdout.close()
            code = child.proc.returncode
            if child.kind != WORKER:
                self.aux_exited(child, code)
                continue
            if child.stopping or self.stopping:
                continue
            log("worker_died", slot=child.slot, pid=pid, code=code, generation=child.generation)
            if child.generation == self.reload.pending:
                # A worker of a reload that is not live yet: the reload fails, the
                # running generation goes on serving and nothing counts against it.
                self.reload.abort("a new worker exited before it was ready")
                continue
            if code == EXIT_BOOT or not child.ready:  # died before it ever accepted
                self.boot_failures += 1
                if self.boot_failures >= MAX_BOOT_FAILURES:
                    log("supervisor_giving_up", reason="workers keep failing at boot",
                        failures=self.boot_failures)
                    self.exit_code = 1
                    self.begin_stop(graceful=False)
                    return
            self.worker_restarts += 1
            self.spawn(child.slot, child.generation)

    def aux_exited(self, child: Child, code: int) -> None:
        """The inference or admin process exited: replace it, at once if it had
        been running (or was asked to restart), with a growing delay if it keeps
        failing at boot.  Workers never depend on either to serve traffic."""
        kind = child.kind
        if self.stopping:
            return
        if child.stopping:  # restarted on purpose (reload): the new one starts now
            self.spawn_aux(kind)
            return
        log("child_died", kind=kind, pid=child.pid, code=code)
        if kind == INFERENCE:
            self.inference_restarts += 1
        if child.ready and time.monotonic() - child.started > 10:
            self.aux_failures[kind] = 0
            self.spawn_aux(kind)
            return
        n = self.aux_failures[kind] = self.aux_failures[kind] + 1
        delay = 0.0 if n == 1 and child.ready else min(AUX_BACKOFF_MAX, 0.5 * 2 ** (n - 1))
        if delay:
            log("child_restart_delayed", kind=kind, seconds=delay, failures=n)
        self.aux_due[kind] = time.monotonic() + delay

    # -- reload (lb/supervisor/reload.py) -----------------------------------------------------

    def handle_hup(self) -> None:
        if not self.stopping:
            self.reload.start()

    # -- stop -------------------------------------------------------------------

    def begin_stop(self, graceful: bool = True) -> None:
        if self.stopping and graceful:
            graceful = False  # a second signal: stop at once
        self.stopping = True
        self.stop_deadline = time.monotonic() + (self.cfg.timeouts.drain + 1 if graceful else 2)
        log("supervisor_stopping", graceful=graceful)
        self.kill_all(signal.SIGTERM if graceful else signal.SIGQUIT)
        # Stopping for good: drop the listeners so new connections are refused at
        # once instead of queueing for workers that no longer accept.
        for sock in self.sockets + self.tls_sockets:
            sock.close()
        self.aux_due.clear()

    def kill_all(self, sig: int) -> None:
        for child in self.children.values():
            child.send(sig)

    def handle_term(self) -> None:
        self.begin_stop(graceful=True)

    def handle_int(self) -> None:
        self.begin_stop(graceful=True)

    def handle_quit(self) -> None:
        self.begin_stop(graceful=False)

    def handle_usr1(self) -> None:
        """Log rotation: reopen --log-file, and have every child do the same."""
        if reopen():
            log("logs_reopened")
            for c in self.children.values():
                if c.ready:  # one still booting has no handler yet, and opens the new file anyway
                    c.send(signal.SIGUSR1)
        else:
            log("logs_not_reopened", reason="no --log-file: stderr belongs to the service manager")

    def handle_chld(self) -> None:
        pass  # reap() runs after every dispatch

