"""bench/locustfile.py drives lb headless for a few seconds: Locust's own
statistics show traffic of every kind and no failure."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_locust_mixed_traffic_through_lb(backend_factory, lb_factory, tmp_path):
    if shutil.which("locust") is None and subprocess.run(
            [sys.executable, "-c", "import locust"], capture_output=True).returncode != 0:
        pytest.fail("locust is not installed (scripts/test installs the test extra)")
    a, b = backend_factory("a"), backend_factory("b")
    lb = lb_factory([a, b], workers=2, strategy="p2c_ewma")
    prefix = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--headless",
         "-u", "10", "-r", "10", "-t", "5s", "--host", f"http://127.0.0.1:{lb.port}",
         "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"],
        cwd=tmp_path, capture_output=True, text=True, timeout=90,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 100, total
    assert int(total["Failure Count"]) == 0, total
    for name in ("/api/items", "/api/items/[id]", "/reports/daily", "/api/orders"):
        assert int(rows[name]["Request Count"]) > 0, name
    # and lb really served them, from both backends
    assert len(a.requests()) > 0 and len(b.requests()) > 0
