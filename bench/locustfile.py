"""Mixed traffic for load-testing lb with Locust.

    locust -f bench/locustfile.py --host http://127.0.0.1:8080
    locust -f bench/locustfile.py --host http://127.0.0.1:8080 --headless -u 50 -r 10 -t 60s

Each simulated user keeps one keep-alive connection (a `requests` session)
and mixes request classes of different cost, as a typical API front sees
them: cheap listing reads, item reads, an occasional expensive report, and a
share of POSTs with JSON bodies of varied size.  Paths match the request
classes of configs/strategies/ml.toml (`/reports` is the heavy class), so the
learned policy sees classes worth telling apart.

Environment knobs: LB_LOCUST_WAIT_MIN / LB_LOCUST_WAIT_MAX (seconds between
a user's requests, default 0.05 / 0.2).
"""

from __future__ import annotations

import json
import os
import random

from locust import HttpUser, between, task

WAIT_MIN = float(os.environ.get("LB_LOCUST_WAIT_MIN", "0.05"))
WAIT_MAX = float(os.environ.get("LB_LOCUST_WAIT_MAX", "0.2"))


class ApiUser(HttpUser):
    wait_time = between(WAIT_MIN, WAIT_MAX)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.client.headers.update({"User-Agent": "lb-locust", "Accept": "application/json"})

    @task(10)
    def list_items(self) -> None:
        self.client.get(f"/api/items?page={self.rng.randint(1, 20)}", name="/api/items")

    @task(5)
    def get_item(self) -> None:
        self.client.get(f"/api/items/{self.rng.randint(1, 10_000)}", name="/api/items/[id]")

    @task(1)
    def report(self) -> None:
        self.client.get("/reports/daily", name="/reports/daily")

    @task(3)
    def create_order(self) -> None:
        lines = [{"sku": self.rng.randint(1, 500), "qty": self.rng.randint(1, 5)}
                 for _ in range(self.rng.choice((1, 3, 10, 50)))]
        with self.client.post("/api/orders", data=json.dumps({"lines": lines}),
                              headers={"Content-Type": "application/json"},
                              name="/api/orders", catch_response=True) as resp:
            if resp.status_code >= 400:
                resp.failure(f"status {resp.status_code}")
            else:
                resp.success()
