"""`lb run --log-file`: every process logs to the file; after it is renamed,
SIGUSR1 to the supervisor makes every process reopen it at its path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, LBRun, free_port, wait_port
from tests.rawhttp import get
from tests.supervision import live_workers


def events(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        out.append(json.loads(line))  # every line is JSON
    return out


def wait_events(path, name: str, count: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in events(path) if e["event"] == name] if path.exists() else []
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_sigusr1_reopens_the_log_file_in_every_process(tmp_path, backend):
    port = free_port()
    cfg = tmp_path / "lb.toml"
    cfg.write_text(f'listen = "127.0.0.1:{port}"\nstrategy = "ml"\n[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
                   f'[[backends]]\naddress = "{backend.address}"\nname = "b1"\n')
    logfile = tmp_path / "lb.log"
    run = LBRun(cfg, workers=2, args=("--log-file", str(logfile)), wait=False)
    proc = run.proc
    try:
        wait_port(port)
        assert len(wait_events(logfile, "worker_ready", 2)) == 2
        wait_events(logfile, "inference_ready", 1)
        wait_events(logfile, "admin_ready", 1)
        assert get(port, "/")[0] == 200
        rotated = tmp_path / "lb.log.1"
        os.rename(logfile, rotated)
        proc.send_signal(signal.SIGUSR1)
        reopened = wait_events(logfile, "logs_reopened", 5)
        pids = {e["pid"] for e in reopened}
        workers = set(live_workers(proc.pid))
        assert len(workers) == 2 and workers <= pids and proc.pid in pids
        assert len(pids) == 5  # supervisor, 2 workers, inference, admin
        assert not [e for e in events(rotated) if e["event"] == "logs_reopened"]
    finally:
        run.stop()
    run.log.join(5)
    assert proc.returncode == 0
    assert run.log.lines == []  # everything went to the file, nothing to stderr
    assert "supervisor_exit" in [e["event"] for e in events(logfile)]


def test_unwritable_log_file_is_a_clear_error(tmp_path, backend):
    cfg = tmp_path / "lb.toml"
    cfg.write_text(f'listen = "127.0.0.1:{free_port()}"\n[[backends]]\naddress = "{backend.address}"\n')
    r = subprocess.run([sys.executable, "-m", "lb", "run", "-c", str(cfg), "--log-file",
                        str(tmp_path / "no" / "such" / "dir" / "lb.log")],
                       cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert r.returncode == 2
    assert r.stderr.startswith("lb: --log-file ") and "No such file" in r.stderr
    assert "Traceback" not in r.stderr
