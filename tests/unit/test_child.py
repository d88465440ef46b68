"""lb/core/child.py, the child side of the supervisor protocol: heartbeats at most
once per interval, the orphan check against the supervisor's pid, the config
on stdin (a bad one is a BootError, not a traceback)."""

from __future__ import annotations

import io
import os
import sys

import pytest

from lb.core import child
from lb.core.config import encode, from_dict


def test_heartbeat_once_per_interval_and_orphan_check(capfd, monkeypatch):
    monkeypatch.setenv(child.SUPERVISOR_PID_ENV, str(os.getppid()))
    live = child.Liveness(interval=1.0)
    assert live.beat(100.0) and live.beat(100.5) and live.beat(101.0)
    assert capfd.readouterr().out == (child.HEARTBEAT * 2).decode()
    assert live.next == 102.0
    monkeypatch.setenv(child.SUPERVISOR_PID_ENV, str(os.getpid()))  # not our parent: the supervisor is gone
    assert child.Liveness().orphaned()
    assert not child.Liveness().beat()


def test_supervisor_pid_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(child.SUPERVISOR_PID_ENV, "4242")
    assert child.supervisor_pid() == 4242
    monkeypatch.setenv(child.SUPERVISOR_PID_ENV, "nonsense")
    assert child.supervisor_pid() == os.getppid()


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def test_config_on_stdin(monkeypatch):
    cfg = from_dict({"listen": "127.0.0.1:18080", "backends": [{"address": "127.0.0.1:9001"}]})
    monkeypatch.setattr(sys, "stdin", _Stdin(encode(cfg)))
    assert child.read_config().listen == "127.0.0.1:18080"
    monkeypatch.setattr(sys, "stdin", _Stdin(b"\x93not a config"))
    with pytest.raises(child.BootError, match="invalid config on stdin"):
        child.read_config()
