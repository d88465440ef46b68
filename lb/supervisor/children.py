"""The supervisor's children: how each kind is started and what it says back.

Three kinds, all started with the validated config as msgpack on stdin:
  * workers (`python -m workers`), one per slot, with that slot's listening socket;
  * the inference process (`python -m inference`), one;
  * the admin process (`python -m lb.admin`), one, with the admin listening socket.
Each runs through lb/core/boot.py: the supervisor's own packages, never the current
directory's.
Each speaks the protocol of lb/core/child.py (the child side, shared by all three):
single bytes on its stdout, READY (accepting / serving), DRAINING (no longer
accepting: workers) and HEARTBEAT (once a second from inside its loop; a
child silent for `timeouts.heartbeat` is stuck and gets killed, then
replaced like any death); exit code EXIT_BOOT means "could not boot" (bad
socket, config or package).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

from lb.core.boot import python_argv
from lb.core.child import DRAINING, READY, SUPERVISOR_PID_ENV

WORKER = "worker"
INFERENCE = "inference"
ADMIN = "admin"

BOOT_TIMEOUT = 15.0  # seconds for an auxiliary child to say R
class Child:
    __slots__ = ("proc", "kind", "slot", "generation", "ready", "stopping", "drained",
                 "started", "heard", "fd", "killed")

    def __init__(self, proc: subprocess.Popen, kind: str, slot: int, generation: int) -> None:
        self.proc = proc
        self.kind = kind
        self.slot = slot
        self.generation = generation
        self.ready = False  # said "R": accepting / serving
        self.stopping = False  # sent SIGTERM (or killed) on purpose
        self.drained = False  # said "D": no longer accepting
        self.killed = False  # SIGKILLed as stuck; reaped and replaced like a crash
        self.started = self.heard = time.monotonic()
        self.fd = proc.stdout.fileno()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_signals(self) -> None:
        """Take what the child wrote on its stdout (non-blocking)."""
        try:
            data = os.read(self.fd, 256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return
        self.heard = time.monotonic()
        if READY in data:
            self.ready = True
        if DRAINING in data:
            self.drained = True

    def silent_for(self, now: float) -> float:
        return now - self.heard

    def send(self, sig: int) -> None:
        """Signal the child.  Not Popen.send_signal: it polls first, and a child
        it finds dead would be reaped behind the supervisor's back (never seen
        by its waitpid loop, so never replaced nor removed).  Until the
        supervisor reaps it, the pid is this child's, alive or zombie."""
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def start(kind: str, slot: int, generation: int, blob: bytes, runtime_dir: str,
          sock: socket.socket | None = None, tls_sock: socket.socket | None = None,
          env: dict[str, str] | None = None) -> Child:
    fds = [sock.fileno()] if sock is not None else []
    if kind == WORKER:
        argv = [*python_argv("workers"), "--fd", str(sock.fileno()), "--slot", str(slot),
                "--runtime", runtime_dir, "--generation", str(generation)]
        if tls_sock is not None:  # the HTTPS listener's socket for this slot
            argv += ["--tls-fd", str(tls_sock.fileno())]
            fds.append(tls_sock.fileno())
    elif kind == INFERENCE:
        argv = [*python_argv("inference"), "--runtime", runtime_dir]
    elif kind == ADMIN:
        argv = [*python_argv("lb.admin"), "--runtime", runtime_dir, "--fd", str(sock.fileno())]
    else:  # pragma: no cover - programming error
        raise ValueError(kind)
    env = dict(os.environ, **(env or {}), **{SUPERVISOR_PID_ENV: str(os.getpid())})
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=fds,
        # Its own process group: a terminal's Ctrl-C reaches only the supervisor,
        # which stops the children in order (a child still importing its modules
        # would otherwise die of KeyboardInterrupt with a traceback).
        process_group=0,
    )
    try:
        proc.stdin.write(blob)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    os.set_blocking(proc.stdout.fileno(), False)
    return Child(proc, kind, slot, generation)
