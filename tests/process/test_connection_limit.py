"""limits.max_connections: a worker stops accepting at its cap, and running out
of file descriptors is never blamed on a backend."""

from __future__ import annotations

import socket

import psutil
import pytest

from tests.rawhttp import RawConn, build_request, get
from tests.supervision import wait_until


def accepted(lb) -> int:
    """Client connections the worker holds (accepted sockets on the lb port)."""
    (pid,) = lb.worker_pids()
    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
               if c.laddr and c.laddr.port == lb.port and c.status == psutil.CONN_ESTABLISHED)


def blamed(lb) -> list:
    return lb.log.events("backend_ejected") + lb.log.events("ejection_skipped")


def test_connections_beyond_max_connections_wait_until_others_close(lb_factory, backend):
    lb = lb_factory([backend], extra="[limits]\nmax_connections = 4\n[outlier]\nconsecutive_failures = 2")
    held = [RawConn(lb.port) for _ in range(4)]
    try:
        for c in held:
            assert c.request("GET", "/").status == 200
        assert lb.log.wait_for("accept_paused")[0]["max_connections"] == 4
        extra = [RawConn(lb.port, timeout=10) for _ in range(3)]
        for c in extra:
            c.send(build_request("GET", "/"))  # queued in the kernel, not accepted
        # A round trip on a held connection: the worker's loop has run since.
        assert held[0].request("GET", "/").status == 200
        assert accepted(lb) == 4
        for c in extra:
            c.sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                c.sock.recv(1)  # nothing answered
            c.sock.setblocking(True)
        # Two close: below the resume mark, the waiting ones are served in turn.
        held.pop().close()
        held.pop().close()
        for c in extra:
            resp = c.read_response()
            assert resp.status == 200 and resp.body == b"backend b1\n"
            c.close()
        assert lb.log.wait_for("accept_resumed")
        assert not blamed(lb)
        assert get(lb.port, "/")[0] == 200
    finally:
        for c in held:
            c.close()


def test_out_of_file_descriptors_is_a_local_503_not_a_backend_failure(lb_factory, backend):
    # The default max_connections follows the descriptor limit at boot; lowering
    # the worker's limit afterwards makes it run out the way a host would.
    lb = lb_factory([backend], extra="[outlier]\nconsecutive_failures = 2")
    (pid,) = lb.worker_pids()
    assert get(lb.port, "/")[0] == 200
    proc = psutil.Process(pid)
    soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
    proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds() + 8, hard))
    clients = []
    statuses = []
    try:
        for _ in range(24):
            s = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
            s.sendall(build_request("GET", "/slow/300"))
            clients.append(RawConn.from_socket(s))
        for c in clients:
            try:
                statuses.append(c.read_response().status)
            except (EOFError, ConnectionResetError):
                statuses.append(None)  # accepted and closed at once (libuv's EMFILE reserve)
    finally:
        for c in clients:
            c.close()
    assert 503 in statuses, statuses
    ev = lb.log.wait_for("local_resource_error")[0]
    assert ev["error"] == "EMFILE"
    assert not blamed(lb), blamed(lb)
    # With descriptors back, the same backend serves again (it was never ejected).
    proc.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    assert wait_until(lambda: get(lb.port, "/")[0] == 200, 10)
    assert not blamed(lb)


@pytest.mark.parametrize("section, line, field", [
    ("limits", "max_connections = -1", "limits.max_connections"),
    ("limits", 'max_connections = "many"', "limits.max_connections"),
    ("limits", 'max_response_head = "100B"', "limits.max_response_head"),
    ("timeouts", "tunnel_idle = 0", "timeouts.tunnel_idle"),
])
def test_new_limits_are_validated_naming_file_and_field(tmp_path, section, line, field):
    import subprocess
    import sys

    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[{section}]\n{line}\n[[backends]]\naddress = "127.0.0.1:9001"\n')
    r = subprocess.run([sys.executable, "-m", "lb", "check", "-c", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"{cfg}: {field}: " in r.stderr, r.stderr
