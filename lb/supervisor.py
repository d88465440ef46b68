"""The supervisor: owns the listening sockets, starts and replaces workers.

Signal handlers only enqueue; `run()` is one loop that dispatches each signal
to a `handle_<name>` method, reaps children and replaces the ones that died.
The listening sockets are created once, one SO_REUSEPORT socket per worker
slot, and handed to every generation of workers, so neither a reload nor a
respawn ever closes a listener (closing one would reset the connections
waiting in its accept queue).

Reload (SIGHUP) starts the new generation first, waits until every new worker
says it is accepting, then asks the old generation to drain.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time

from lb import config as cfgmod
from lb.log import log

EXIT_BOOT = 3  # a worker that could not start (see workers.worker)
READY_TIMEOUT = 15.0
MAX_BOOT_FAILURES = 5


class SupervisorError(Exception):
    pass


def listen_socket(address: str, backlog: int) -> socket.socket:
    host, port = cfgmod.parse_address(address, allow_hostname=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise SupervisorError(f"cannot listen on {address}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def ensure_free(address: str) -> None:
    """Fail if anything listens on `address` already.

    SO_REUSEPORT would otherwise let a second lb (same user) bind the same port
    and take half of the first one's connections.  A socket without
    SO_REUSEPORT cannot bind where a listener exists, which makes the check.
    """
    host, port = cfgmod.parse_address(address, allow_hostname=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SupervisorError(f"cannot listen on {address}: {exc.strerror}") from None


class Child:
    __slots__ = ("proc", "slot", "generation", "ready", "stopping", "drained")

    def __init__(self, proc: subprocess.Popen, slot: int, generation: int) -> None:
        self.proc = proc
        self.slot = slot
        self.generation = generation
        self.ready = False  # said "R": accepting
        self.stopping = False  # sent SIGTERM (or killed) on purpose
        self.drained = False  # said "D": no longer accepting


class Supervisor:
    SIGNALS = ("SIGHUP", "SIGTERM", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGCHLD")

    def __init__(self, cfg: cfgmod.Config, path: str, workers: int | None = None) -> None:
        self.cfg = cfg
        self.path = path
        self.n_workers = workers or cfg.workers
        self.sockets: list[socket.socket] = []
        self.children: dict[int, Child] = {}
        self.generation = 0
        self.blob = cfgmod.encode(cfg)
        self.queue: list[int] = []
        self.stopping = False
        self.stop_deadline = 0.0
        self.boot_failures = 0
        self.pending_generation: int | None = None  # a reload waiting for its workers
        self.pending_cfg: cfgmod.Config | None = None
        self.pending_deadline = 0.0
        self.last_generation = 0
        self.retiring: list[Child] = []  # the previous generation, until it stops accepting
        self.retire_deadline = 0.0
        self.exit_code = 0
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    # -- setup ----------------------------------------------------------------

    def bind(self) -> None:
        ensure_free(self.cfg.listen)
        self.sockets = [listen_socket(self.cfg.listen, self.cfg.backlog) for _ in range(self.n_workers)]

    def _signal(self, signum, _frame) -> None:
        self.queue.append(signum)
        try:
            os.write(self.wake_w, b"!")
        except OSError:
            pass

    def spawn(self, slot: int, generation: int, blob: bytes | None = None) -> Child:
        """Start a worker for `slot`, configured with `blob` (default: the running config)."""
        sock = self.sockets[slot]
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "--fd", str(sock.fileno()), "--slot", str(slot)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(sock.fileno(),),
        )
        try:
            proc.stdin.write(self.blob if blob is None else blob)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        os.set_blocking(proc.stdout.fileno(), False)
        child = Child(proc, slot, generation)
        self.children[proc.pid] = child
        return child

    # -- main loop ------------------------------------------------------------

    def run(self) -> int:
        self.bind()
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._signal)
        log("supervisor_start", listen=self.cfg.listen, workers=self.n_workers,
            strategy=self.cfg.strategy, backends=len(self.cfg.backends), config=self.path)
        self.generation = self.last_generation = 1
        for slot in range(self.n_workers):
            self.spawn(slot, self.generation)
        while True:
            self._wait()
            while self.queue:
                signum = self.queue.pop(0)
                name = signal.Signals(signum).name[3:].lower()
                getattr(self, f"handle_{name}")()
            self.reap()
            self.check_pending()
            if self.stopping:
                if not self.children:
                    break
                if time.monotonic() > self.stop_deadline:
                    self.kill_all(signal.SIGKILL)
        for s in self.sockets:
            s.close()
        log("supervisor_exit", code=self.exit_code)
        return self.exit_code

    def _wait(self) -> None:
        fds = [self.wake_r] + [c.proc.stdout.fileno() for c in self.children.values()
                               if not c.ready or (c.stopping and not c.drained)]
        try:
            readable, _, _ = select.select(fds, [], [], 0.5)
        except InterruptedError:
            return
        for fd in readable:
            if fd == self.wake_r:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            for child in self.children.values():
                if child.proc.stdout.fileno() == fd:
                    try:
                        data = os.read(fd, 64)
                    except BlockingIOError:
                        data = b""
                    if b"R" in data:
                        child.ready = True
                        self.boot_failures = 0
                    if b"D" in data:
                        child.drained = True
                    break

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
            if child.stopping or self.stopping:
                continue
            log("worker_died", slot=child.slot, pid=pid, code=code, generation=child.generation)
            if child.generation == self.pending_generation:
                # A worker of a reload that is not live yet: the reload fails, the
                # running generation goes on serving and nothing counts against it.
                self.abort_reload("a new worker exited before it was ready")
                continue
            if code == EXIT_BOOT or not child.ready:  # died before it ever accepted
                self.boot_failures += 1
                if self.boot_failures >= MAX_BOOT_FAILURES:
                    log("supervisor_giving_up", reason="workers keep failing at boot",
                        failures=self.boot_failures)
                    self.exit_code = 1
                    self.begin_stop(graceful=False)
                    return
            self.spawn(child.slot, child.generation)

    # -- reload -----------------------------------------------------------------

    def check_pending(self) -> None:
        if self.retiring:
            # reload_done once the old generation stopped accepting (or gave no sign in time).
            if all(c.drained or c.proc.pid not in self.children for c in self.retiring) \
                    or time.monotonic() > self.retire_deadline:
                self.retiring = []
                log("reload_done", generation=self.generation)
        gen = self.pending_generation
        if gen is None:
            return
        new = [c for c in self.children.values() if c.generation == gen]
        if len(new) == self.n_workers and all(c.ready for c in new):
            # The new generation accepts: now, and only now, retire the old one.
            for c in self.children.values():
                if c.generation != gen and not c.stopping:
                    c.stopping = True
                    c.proc.send_signal(signal.SIGTERM)
                    self.retiring.append(c)
            self.retire_deadline = time.monotonic() + 3.0
            self.generation = gen
            self.cfg = self.pending_cfg
            self.blob = cfgmod.encode(self.cfg)
            self.pending_generation = self.pending_cfg = None
            log("reload_switched", generation=gen)
        elif time.monotonic() > self.pending_deadline:
            self.abort_reload("new workers did not become ready in time")

    def abort_reload(self, reason: str, event: str = "reload_failed") -> None:
        """Stop the pending generation; the running one and its config stay."""
        gen = self.pending_generation
        for c in self.children.values():
            if c.generation == gen and not c.stopping:
                c.stopping = True
                # SIGTERM, not SIGKILL: a worker may accept from the shared sockets
                # before its "R" is read; it drains what it took.  One still booting
                # has no handler yet and dies of it at once.
                c.proc.send_signal(signal.SIGTERM)
        self.pending_generation = self.pending_cfg = None
        log(event, generation=gen, reason=reason)

    def handle_hup(self) -> None:
        if self.stopping:
            return
        try:
            cfg = cfgmod.load(self.path)
        except cfgmod.ConfigError as exc:
            log("reload_rejected", error=str(exc))
            return
        if cfg.listen != self.cfg.listen or (cfg.workers != self.cfg.workers and self.n_workers == self.cfg.workers):
            log("reload_rejected", error=f"{self.path}: listen/workers: changing these needs a restart")
            return
        if self.pending_generation is not None:
            # A newer config supersedes the reload still starting up.
            self.abort_reload("a newer SIGHUP replaces it", event="reload_superseded")
        self.last_generation += 1
        gen = self.last_generation
        blob = cfgmod.encode(cfg)
        for slot in range(self.n_workers):
            self.spawn(slot, gen, blob)
        self.pending_generation = gen
        self.pending_cfg = cfg
        self.pending_deadline = time.monotonic() + READY_TIMEOUT
        log("reload_start", generation=gen, strategy=cfg.strategy, backends=len(cfg.backends))

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
        for sock in self.sockets:
            sock.close()

    def kill_all(self, sig: int) -> None:
        for child in self.children.values():
            try:
                child.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def handle_term(self) -> None:
        self.begin_stop(graceful=True)

    def handle_int(self) -> None:
        self.begin_stop(graceful=True)

    def handle_quit(self) -> None:
        self.begin_stop(graceful=False)

    def handle_usr1(self) -> None:
        log("reopen_logs")  # logs go to stderr; the service manager owns the file

    def handle_chld(self) -> None:
        pass  # reap() runs after every dispatch

