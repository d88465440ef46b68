"""Protection: per-client rate limit (429), instance-wide in-flight cap (503),
per-backend circuit breaking (another backend, else 503); all with Retry-After."""

from __future__ import annotations

import threading
import time
from collections import Counter


from tests.rawhttp import get



def parallel(port: int, n: int) -> list[tuple[int, dict]]:
    out: list = [None] * n

    def one(i):
        status, headers, _ = get(port, "/")
        out[i] = (status, headers)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(0.02)  # in order, each one in flight before the next
    for t in threads:
        t.join(10)
    return out


def test_rate_limit_per_client_answers_429_then_recovers(servers, lb_factory):
    a = servers("a")
    lb = lb_factory([a], extra="[protection]\nrate_limit = 5\nrate_burst = 5\nretry_after = 2\n")
    statuses = []
    for _ in range(8):
        status, headers, _ = get(lb.port, "/")
        statuses.append(status)
        if status == 429:
            assert headers["Retry-After"] == "2"
    assert statuses[:5] == [200] * 5
    assert statuses.count(429) >= 2  # refill is 5/s: at most one more fits meanwhile
    assert a.hits == statuses.count(200)  # a limited request never reaches a backend
    time.sleep(1.1)
    assert get(lb.port, "/")[0] == 200


def test_in_flight_cap_sheds_with_503(servers, lb_factory):
    slow = servers("slow", delay=0.6)
    lb = lb_factory([slow], extra="[protection]\nmax_inflight = 2\n")
    results = parallel(lb.port, 4)
    codes = Counter(status for status, _ in results)
    assert codes == Counter({200: 2, 503: 2})
    assert all(h.get("Retry-After") == "1" for st, h in results if st == 503)
    assert slow.hits == 2


def test_a_full_backend_sends_requests_to_another_then_503(servers, lb_factory):
    a, b = servers("a", delay=0.6), servers("b", delay=0.6)
    lb = lb_factory([a, b], strategy="round_robin",
                    extra="[protection]\nbackend_max_connections = 1\n")
    results = parallel(lb.port, 3)
    codes = Counter(status for status, _ in results)
    assert codes == Counter({200: 2, 503: 1})
    served = Counter(h.get("X-Backend") for st, h in results if st == 200)
    assert served == Counter(a=1, b=1)  # the breaker spread them, one per backend
