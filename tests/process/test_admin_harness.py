"""The admin test harness itself (tests/adminharness.py): the process boots,
says R, sends heartbeats, and exits 0 on SIGTERM with connections open."""

from __future__ import annotations

import json
import socket
import time

from tests.adminharness import AdminProc, wait_until


def test_boot_ready_and_sigterm():
    admin = AdminProc()
    try:
        assert admin.read_stdout(1, 3) == b"H"  # heartbeat within a second or so
        status, _, body = admin.get("/api/health")
        assert status == 503 and body["live"] is True  # no supervisor status yet
        # open connections (an event stream, an idle keep-alive one) do not hold up the stop
        stream = socket.create_connection(("127.0.0.1", admin.port), timeout=5)
        stream.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        idle = socket.create_connection(("127.0.0.1", admin.port), timeout=5)
        idle.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert stream.recv(100).startswith(b"HTTP/1.1 200") and idle.recv(100).startswith(b"HTTP/1.1 503")
        t0 = time.monotonic()
        assert admin.stop() == 0
        assert time.monotonic() - t0 < 2
        stream.close()
        idle.close()
        # (the admin has exited: its last lines may still be on their way to the reader)
        wait_until(lambda: any('"admin_exit"' in line for line in admin.stderr), timeout=5)
        for line in admin.stderr:  # nothing but JSON events: no traceback on the way out
            json.loads(line)
    finally:
        admin.cleanup()
