"""Hitless reload (SIGHUP): the new generation of workers starts first; once
every one of them says it accepts, the old generation is asked to drain.

A config that does not load, or that changes what only a restart can change
(the listeners, the admin address, the directories, the fleet), is rejected
with a log line and the running generation goes on.  A new worker that dies
before it is ready, or a generation not ready within READY_TIMEOUT, fails the
reload the same way; a newer SIGHUP supersedes one still starting.  The admin
process stays (it takes the new config from the next SupervisorStatus); the
inference process restarts with it.
"""

from __future__ import annotations

import signal
import time

from lb.core import config as cfgmod
from lb.core import tls as tlsmod
from lb.supervisor.children import INFERENCE, WORKER
from lb.core.log import log

READY_TIMEOUT = 15.0  # seconds for a new generation to be accepting
RETIRE_WAIT = 3.0  # seconds for the old one to say it stopped accepting (reload_done)


def restart_needed(old: cfgmod.Config, new: cfgmod.Config, path: str, n_workers: int) -> str | None:
    """Why `new` cannot replace `old` by a reload (the error to log), or None."""
    if new.listen != old.listen or (new.workers != old.workers and n_workers == old.workers):
        return f"{path}: listen/workers: changing these needs a restart"
    if new.tls.listen != old.tls.listen:
        return f"{path}: tls.listen: changing it needs a restart"
    if new.admin.listen != old.admin.listen or new.admin.enabled != old.admin.enabled \
            or new.runtime_dir != old.runtime_dir or new.state_dir != old.state_dir \
            or new.fleet != old.fleet:
        return f"{path}: admin.listen/admin.enabled/runtime_dir/state_dir/fleet: changing these needs a restart"
    return None


class Reload:
    """The supervisor's reloads: the generation starting (`pending`, with its
    config and deadline) and the one retiring."""

    def __init__(self, sup) -> None:
        self.sup = sup
        self.pending: int | None = None  # a generation waiting for its workers
        self.cfg: cfgmod.Config | None = None
        self.deadline = 0.0
        self.retiring: list = []  # the previous generation's workers, until they stop accepting
        self.retire_deadline = 0.0

    def start(self) -> None:
        sup = self.sup
        try:
            cfg = cfgmod.load(sup.path)
        except cfgmod.ConfigError as exc:
            log("reload_rejected", error=str(exc))
            return
        problem = restart_needed(sup.cfg, cfg, sup.path, sup.n_workers)
        if problem is None:
            try:
                tlsmod.check(cfg, sup.path)
            except cfgmod.ConfigError as exc:  # the running workers keep their certificates
                problem = str(exc)
        if problem is not None:
            log("reload_rejected", error=problem)
            return
        if self.pending is not None:
            # A newer config supersedes the reload still starting up.
            self.abort("a newer SIGHUP replaces it", event="reload_superseded")
        sup.last_generation += 1
        gen = sup.last_generation
        blob = sup.encode(cfg)
        for slot in range(sup.n_workers):
            sup.spawn(slot, gen, blob)
        self.pending = gen
        self.cfg = cfg
        self.deadline = time.monotonic() + READY_TIMEOUT
        log("reload_start", generation=gen, strategy=cfg.strategy, backends=len(cfg.backends))

    def check(self) -> None:
        """Each turn of the supervisor's loop: switch to a generation that is
        ready, fail one that is late, note the old one drained."""
        sup = self.sup
        if self.retiring:
            # reload_done once the old generation stopped accepting (or gave no sign in time).
            if all(c.drained or c.proc.pid not in sup.children for c in self.retiring) \
                    or time.monotonic() > self.retire_deadline:
                self.retiring = []
                log("reload_done", generation=sup.generation)
        gen = self.pending
        if gen is None:
            return
        new = [c for c in sup.children.values() if c.generation == gen]
        if len(new) == sup.n_workers and all(c.ready for c in new):
            # The new generation accepts: now, and only now, retire the old one.
            # Only its workers: the admin process stays, so its listener never
            # blinks and its counters of retired workers are kept; the inference
            # process is restarted on purpose below.
            for c in sup.children.values():
                if c.kind == WORKER and c.generation != gen and not c.stopping:
                    c.stopping = True
                    c.send(signal.SIGTERM)
                    self.retiring.append(c)
            self.retire_deadline = time.monotonic() + RETIRE_WAIT
            sup.generation = gen
            sup.cfg = self.cfg
            sup.blob = sup.encode(sup.cfg)
            self.pending = self.cfg = None
            sup.reloads += 1
            log("reload_switched", generation=gen)
            inf = sup.aux(INFERENCE)
            if inf is not None:  # the inference process takes the new config by restarting
                inf.stopping = True
                inf.send(signal.SIGTERM)
            sup.next_status = 0.0  # tell the admin process about the new config now
        elif time.monotonic() > self.deadline:
            self.abort("new workers did not become ready in time")

    def abort(self, reason: str, event: str = "reload_failed") -> None:
        """Stop the pending generation; the running one and its config stay."""
        gen = self.pending
        for c in self.sup.children.values():
            if c.generation == gen and not c.stopping:
                c.stopping = True
                # SIGTERM, not SIGKILL: a worker may accept from the shared sockets
                # before its "R" is read; it drains what it took.  One still booting
                # has no handler yet and dies of it at once.
                c.send(signal.SIGTERM)
        self.pending = self.cfg = None
        if event == "reload_failed":
            self.sup.reloads_failed += 1
        log(event, generation=gen, reason=reason)
