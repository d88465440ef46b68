"""A real Prometheus (Debian package `prometheus`) scrapes the admin process,
evaluates configs/alerts.yml and answers every Grafana expression."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest

from tests.adminharness import ROOT, AdminProc, Feeder, wait_until
from tests.conftest import free_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
CONFIGS = ROOT / "configs"


def api(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def query(port: int, expr: str) -> list[dict]:
    body = api(port, "/api/v1/query", query=expr)
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_checks_the_shipped_files(tmp_path):
    r = subprocess.run([PROMTOOL, "check", "rules", str(CONFIGS / "alerts.yml")], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"SUCCESS" in r.stdout + r.stderr
    r = subprocess.run([PROMTOOL, "check", "config", str(CONFIGS / "prometheus.yml")],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus)")
def test_prometheus_scrapes_and_queries(tmp_path):
    admin = AdminProc()
    feeder = Feeder(admin.runtime, [("fast", 1), ("slow", 2), ("flaky", 1)], ["default", "upload", "api"]).start()
    port = free_port()
    shutil.copy(CONFIGS / "alerts.yml", tmp_path / "alerts.yml")
    # the shipped scrape config, pointed at this admin process and made faster
    conf = (CONFIGS / "prometheus.yml").read_text()
    conf = conf.replace("127.0.0.1:9900", f"127.0.0.1:{admin.port}")
    conf = conf.replace("scrape_interval: 5s", "scrape_interval: 1s").replace("evaluation_interval: 5s",
                                                                             "evaluation_interval: 1s")
    assert f"127.0.0.1:{admin.port}" in conf and "scrape_interval: 1s" in conf
    (tmp_path / "prometheus.yml").write_text(conf)
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return prom.poll() is not None  # stop waiting if it died
        wait_until(ready, timeout=20, interval=0.2)
        assert prom.poll() is None, prom.stderr.read().decode()

        up = wait_until(lambda: query(port, 'up{job="lb"}'), timeout=15, interval=0.3)
        assert up[0]["value"][1] == "1"
        # rates need two scrapes
        reqs = wait_until(lambda: (r := query(port, "sum by (backend) (rate(lb_backend_requests_total[1m]))"))
                          and len(r) == 3 and r, timeout=20, interval=0.5)
        rps = {r["metric"]["backend"]: float(r["value"][1]) for r in reqs}
        assert rps["fast"] > rps["slow"] > rps["flaky"] > 0

        p99 = query(port, "histogram_quantile(0.99, sum by (backend, le) "
                          "(rate(lb_upstream_latency_seconds_bucket[1m])))")
        p99s = {r["metric"]["backend"]: float(r["value"][1]) for r in p99}
        assert set(p99s) == {"fast", "slow", "flaky"} and p99s["slow"] > p99s["fast"] > 0
        model = query(port, "lb_model_info")
        assert model[0]["metric"]["version"] == "test-model-7"

        # every Grafana expression is valid PromQL here and most return data
        dash = json.loads((CONFIGS / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        empty = []
        for e in exprs:
            e = e.replace("$__rate_interval", "1m").replace("$instance", ".*")
            if not query(port, e):
                empty.append(e)
        assert len(empty) <= len(exprs) // 4, empty
        share = query(port, 'sum(sum by (backend) (rate(lb_backend_class_requests_total[1m])) / ignoring(backend) '
                            'group_left sum(rate(lb_backend_class_requests_total[1m])))')
        assert abs(float(share[0]["value"][1]) - 1) < 1e-6

        # the alert rules load and evaluate without errors
        def rules_evaluated():
            groups = api(port, "/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return len(rules) == 11 and all(r.get("lastEvaluation", "").startswith("20") for r in rules) and rules
        rules = wait_until(rules_evaluated, timeout=15, interval=0.5)
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        firing = {r["name"]: r["state"] for r in rules}
        assert firing["LbNoRoutableBackend"] == "inactive" and firing["LbAdminDown"] == "inactive"
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        feeder.stop()
        admin.cleanup()
