"""`/metrics`: names, types, histogram consistency, and counters that never
go backwards when workers restart (new pid from zero, or a reused pid)."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb.core.messages import LATENCY_BOUNDS
from tests.adminharness import AdminProc, Feeder, FakeWorker, metric_samples, wait_until

BACKENDS = [("fast", 1), ("slow", 2), ("flaky", 1)]
CLASSES = ["default", "upload", "api"]

EXPECTED = {
    # name: type (as exposed; counters keep their family name without _total)
    "lb_backend_requests": "counter",
    "lb_backend_responses": "counter",
    "lb_backend_class_requests": "counter",
    "lb_backend_class_errors": "counter",
    "lb_backend_connect_errors": "counter",
    "lb_backend_timeouts": "counter",
    "lb_backend_retries": "counter",
    "lb_backend_resets": "counter",
    "lb_upstream_latency_seconds": "histogram",
    "lb_backend_inflight": "gauge",
    "lb_backend_idle_connections": "gauge",
    "lb_backend_up": "gauge",
    "lb_backend_drained": "gauge",
    "lb_backend_table_weight": "gauge",
    "lb_client_connections": "gauge",
    "lb_rejected": "counter",
    "lb_no_backend": "counter",
    "lb_shed": "counter",
    "lb_limited": "counter",
    "lb_client_abandoned": "counter",
    "lb_worker_restarts": "counter",
    "lb_reloads": "counter",
    "lb_config_generation": "gauge",
    "lb_workers_expected": "gauge",
    "lb_workers_ready": "gauge",
    "lb_inference_up": "gauge",
    "lb_inference_restarts": "counter",
    "lb_policy_mode": "gauge",
    "lb_model_info": "gauge",  # info-style: the text format has no info type
    "lb_strategy_info": "gauge",
    "lb_table_seq": "gauge",
    "lb_table_age_seconds": "gauge",
    "lb_prediction_error": "gauge",
    "lb_inference_tick_seconds": "gauge",
    "lb_model_error_weight": "gauge",
}


@pytest.fixture
def env():
    admin = AdminProc()
    feeder = Feeder(admin.runtime, BACKENDS, CLASSES).start()
    try:
        wait_until(lambda: b"lb_workers_ready" in admin.get("/metrics")[2] and b"lb_table_seq" in admin.get("/metrics")[2])
        yield admin, feeder
    finally:
        feeder.stop()
        admin.cleanup()


def scrape(admin) -> str:
    status, hdrs, body = admin.get("/metrics")
    assert status == 200 and hdrs["Content-Type"].startswith("text/plain; version=")
    return body.decode()


def test_names_types_help(env):
    admin, _ = env
    families = {f.name: f for f in text_string_to_metric_families(scrape(admin))}
    for name, kind in EXPECTED.items():
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)
        assert families[name].documentation, name
    assert all(n.startswith("lb_") for n in families)
    s = metric_samples(scrape(admin))
    assert s['lb_reloads_total{result="ok"}'] == 2 and s['lb_reloads_total{result="failed"}'] == 1
    assert s["lb_config_generation"] == 3 and s["lb_workers_expected"] == 2 and s["lb_inference_up"] == 1
    assert s['lb_policy_mode{mode="learned",reason=""}'] == 2
    assert s['lb_model_info{mode="learned",reason="",version="test-model-7"}'] == 1
    assert s["lb_prediction_error"] == 0.25 and s["lb_inference_tick_seconds"] == 0.0015
    assert s['lb_model_error_weight{backend="flaky"}'] == 0.97
    assert s['lb_backend_table_weight{backend="fast",class="api"}'] == 0.7
    assert s['lb_backend_up{backend="flaky"}'] == 1 and s["lb_client_connections"] == 10


def test_histogram_consistent(env):
    admin, _ = env
    text = scrape(admin)
    fam = next(f for f in text_string_to_metric_families(text) if f.name == "lb_upstream_latency_seconds")
    series: dict[tuple, dict] = {}
    for smp in fam.samples:
        key = (smp.labels["backend"], smp.labels["class"])
        series.setdefault(key, {"buckets": []})
        if smp.name.endswith("_bucket"):
            series[key]["buckets"].append((float(smp.labels["le"]), smp.value))
        elif smp.name.endswith("_count"):
            series[key]["count"] = smp.value
        elif smp.name.endswith("_sum"):
            series[key]["sum"] = smp.value
    assert {k[0] for k in series} == {"fast", "slow", "flaky"} and {k[1] for k in series} == set(CLASSES)
    for key, sr in series.items():
        les = [le for le, _ in sr["buckets"]]
        assert les == [*LATENCY_BOUNDS, float("inf")], key
        counts = [c for _, c in sr["buckets"]]
        assert counts == sorted(counts) and counts[-1] == sr["count"] > 0
        assert 0 < sr["sum"] / sr["count"] < 1
    s = metric_samples(text)
    fast = sum(v for k, v in s.items() if k.startswith('lb_upstream_latency_seconds_count{backend="fast"'))
    assert fast == s['lb_backend_requests_total{backend="fast"}']  # every fake request got a response head


def totals(admin) -> dict[str, float]:
    s = metric_samples(scrape(admin))
    return {k: v for k, v in s.items() if "_total" in k or k.endswith("_count")}


def test_counters_survive_worker_restarts(env):
    admin, feeder = env
    seen = [totals(admin)]

    def never_backwards():
        now = totals(admin)
        prev = seen[-1]
        for k, v in prev.items():
            if k.startswith("lb_admin_") or k.startswith("lb_worker_restarts") or k.startswith("lb_reloads"):
                continue
            assert now.get(k, 0) >= v, (k, v, now.get(k))
        seen.append(now)
        return now

    time.sleep(0.5)
    before = never_backwards()['lb_backend_requests_total{backend="fast"}']
    # worker 0 dies and is replaced: a new pid counting from zero
    with feeder.lock:
        feeder.workers[0] = FakeWorker(50000, 0, BACKENDS, CLASSES, seed=9)
    for _ in range(4):
        time.sleep(0.25)
        never_backwards()
    # worker 1 is replaced by a process that got the same pid: its sequence restarts
    with feeder.lock:
        feeder.workers[1] = FakeWorker(feeder.workers[1].pid, 1, BACKENDS, CLASSES, seed=10)
    for _ in range(4):
        time.sleep(0.25)
        never_backwards()
    after = seen[-1]['lb_backend_requests_total{backend="fast"}']
    assert after > before
    # gauges only count the live workers: the two replacements
    wait_until(lambda: metric_samples(scrape(admin))["lb_workers_reporting"] == 2, timeout=5)
    s = metric_samples(scrape(admin))
    assert s["lb_client_connections"] == 10


def test_policy_fallback_visible(env):
    admin, feeder = env
    with feeder.lock:
        for w in feeder.workers:
            w.mode = ("ml", "fallback", "stale")
    feeder.table_mode = ("fallback", "inference_fallback")
    s = wait_until(lambda: (m := metric_samples(scrape(admin))).get('lb_policy_mode{mode="fallback",reason="stale"}') == 2 and m)
    assert s["lb_policy_learned"] == 0
    assert s['lb_model_info{mode="fallback",reason="inference_fallback",version="test-model-7"}'] == 1
    assert admin.get("/api/route")[2]["mode"] == "fallback"
    routed = admin.request("POST", "/api/route", {"path": "/"})[2]
    assert routed["why"].startswith("fallback (stale): p2c_ewma") and "ewma x (inflight+1)" in routed["why"]
    wait_until(lambda: any('"policy_mode"' in line and '"stale"' in line for line in admin.stderr), timeout=3)
