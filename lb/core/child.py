"""The child side of the supervisor protocol, shared by every child kind.

The supervisor (lb/supervisor/supervisor.py, lb/supervisor/children.py) starts three kinds of child:
workers, the inference process and the admin process.  Each one:
  * reads the validated config as msgpack on stdin (`read_config`);
  * writes single bytes on its stdout, which the supervisor reads:
    READY once it serves, DRAINING once it no longer accepts (workers), and
    HEARTBEAT once a second from inside its loop (`Liveness.beat`): a child
    silent for `timeouts.heartbeat` is stuck and gets killed;
  * exits with EXIT_OK, or EXIT_BOOT when it could not boot (bad socket,
    config or package), which the supervisor reports instead of retrying it
    as a crash;
  * stops when the supervisor is gone (`Liveness.beat` returns False): its
    parent is no longer the supervisor whose pid it was given.

The supervisor imports the same constants, so both sides speak one protocol.
"""

from __future__ import annotations

import os
import sys
import time

READY = b"R"
DRAINING = b"D"
HEARTBEAT = b"H"
EXIT_OK = 0
EXIT_BOOT = 3
HEARTBEAT_INTERVAL = 1.0  # seconds between two heartbeats
SUPERVISOR_PID_ENV = "LB_SUPERVISOR_PID"


class BootError(Exception):
    """The child cannot start; the message is logged, the exit code is EXIT_BOOT."""


def supervisor_pid() -> int:
    """The pid a child must have as its parent.  Taken from the environment,
    not from getppid() at boot: a supervisor that died while the child was
    still importing would otherwise leave it believing init is its parent."""
    try:
        return int(os.environ[SUPERVISOR_PID_ENV])
    except (KeyError, ValueError):
        return os.getppid()


def tell(byte: bytes) -> None:
    """One protocol byte to the supervisor (never blocks the caller's loop
    for long: the pipe is read at once; a supervisor that went away is not a
    reason to die here, the orphan check is)."""
    try:
        os.write(1, byte)
    except OSError:
        pass


def read_config():
    """The config the supervisor validated, from stdin; BootError if it is not one."""
    import msgspec

    from lb.core import config

    try:
        return config.decode(sys.stdin.buffer.read())
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise BootError(f"invalid config on stdin: {exc}") from None


class Liveness:
    """Heartbeats and the orphan check, called from the child's own loop."""

    def __init__(self, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.parent = supervisor_pid()
        self.interval = interval
        self.next = 0.0

    def beat(self, now: float | None = None) -> bool:
        """Send a heartbeat if one is due.  False once the supervisor is gone."""
        now = time.monotonic() if now is None else now
        if now >= self.next:
            self.next = now + self.interval
            tell(HEARTBEAT)
        return not self.orphaned()

    def orphaned(self) -> bool:
        return os.getppid() != self.parent
