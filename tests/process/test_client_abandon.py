"""A client that closes its connection while its request waits for the
backend's answer has given up on it: lb counts it
(`lb_client_abandoned_total`, nginx's 499) and `ml` learns from it how long
clients wait (workers/patience.py, unit-tested in tests/unit/test_patience.py).
Clients that are answered, or that leave before their request is complete,
are not counted."""

from __future__ import annotations

import socket

from tests.process.test_outlier_ejection import wait_metric
from tests.rawhttp import get
from tests.supervision import wait_until


def give_up(port: int, backend, hits: int) -> None:
    """Send a GET, wait until the backend holds it (its `hits`-th), close."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: backend.hits >= hits, timeout=5)
    finally:
        s.close()


def test_clients_that_give_up_waiting_are_counted(servers, lb_factory):
    slow = servers("slow", delay=1.0)
    lb = lb_factory([slow], strategy="ml")
    status, headers, _ = get(lb.port, "/")  # answered: not counted
    assert (status, headers.get("X-Backend")) == (200, "slow")
    for n in (2, 3, 4):
        give_up(lb.port, slow, n)
    # a request cut off in its head never reached a backend: not counted either
    s = socket.create_connection(("127.0.0.1", lb.port), timeout=5)
    s.sendall(b"GET /half HTTP/1.1\r\nHo")
    s.close()
    text = wait_metric(lb.admin_port, "lb_client_abandoned_total 3.0")
    # the backend did not fail: its connections were dropped on lb's side
    assert 'lb_backend_responses_total{backend="slow",code="5xx"} 0.0' in text
    assert 'lb_backend_responses_total{backend="slow",code="none"} 0.0' in text
    status, headers, _ = get(lb.port, "/")  # and the worker routes on
    assert (status, headers.get("X-Backend")) == (200, "slow")
    assert "lb_client_abandoned_total 3.0" in get(lb.admin_port, "/metrics")[2].decode()
