"""Each strategy reports its own state through the admin API of a running lb:
the learned table, mode and lb_policy_* metrics only when `ml` routes, and
`POST /api/route` picks with the workers' own strategy code (weights count
for least-connections and P2C; `ml` picks by cost, not by weight)."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from tests.rawhttp import get
from tests.supervision import wait_until

TOKEN = "strategies-token"
BACKENDS = '[[backends]]\naddress = "{a1}"\nname = "b1"\nweight = 1\n' \
           '[[backends]]\naddress = "{a2}"\nname = "b2"\nweight = 4\n'
EXTRA = "[learning]\nstats_interval = 0.1\n"


def start(lb_factory, backend_factory, strategy: str, monkeypatch):
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)
    b1, b2 = backend_factory("b1"), backend_factory("b2")
    lb = lb_factory([b1, b2], strategy=strategy, extra=EXTRA,
                    backend_lines=BACKENDS.format(a1=b1.address, a2=b2.address))
    assert wait_until(lambda: (h := api(lb, "GET", "/api/health"))[0] == 200 and h[1]["workers_reporting"],
                      timeout=15)
    return lb


def api(lb, method: str, path: str, body: object = None, token: bool = False):
    headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    data = None if body is None else json.dumps(body).encode()
    status, _, raw = get(lb.admin_port, path, method=method, body=data, headers=headers)
    return status, (json.loads(raw) if raw.startswith(b"{") else raw.decode())


def families(lb) -> dict:
    return {f.name: f for f in text_string_to_metric_families(api(lb, "GET", "/metrics")[1])}


def pin(lb, strategy: str | None) -> None:
    assert api(lb, "POST", "/api/strategy", {"strategy": strategy}, token=True)[0] == 200


def route(lb, path: str = "/") -> dict:
    status, body = api(lb, "POST", "/api/route", {"path": path})
    assert status == 200, body
    return body


def test_weighted_round_robin_shows_configured_weights_not_a_table(lb_factory, backend_factory, monkeypatch):
    lb = start(lb_factory, backend_factory, "weighted_round_robin", monkeypatch)
    lb.log.wait_for("inference_ready", timeout=30)
    # Pinned to ml, the table the inference process publishes shows up ...
    pin(lb, "ml")
    assert wait_until(lambda: api(lb, "GET", "/api/route")[1]["table"] is not None, timeout=15)
    assert wait_until(lambda: "lb_policy_learned" in families(lb), timeout=5)
    # ... and back on the configured weighted_round_robin, only its own state does.
    pin(lb, None)
    r = api(lb, "GET", "/api/route")[1]
    assert r["strategy"] == "weighted_round_robin"
    assert r["table"] is None and r["mode"] is None and r["reason"] is None
    assert r["picks_by"]["weights"] == {"b1": 1, "b2": 4}
    assert r["picks_by"]["shares"] == {"b1": 0.2, "b2": 0.8}
    fams = families(lb)
    for name in ("lb_policy_learned", "lb_policy_mode", "lb_backend_table_weight", "lb_model", "lb_table_seq"):
        assert name not in fams or not fams[name].samples, name
    info = fams["lb_strategy_info"].samples[0].labels
    assert info["strategy"] == "weighted_round_robin"
    listing = api(lb, "GET", "/api/backends")[1]["backends"]
    assert all(b["table_weights"] == {} for b in listing)
    explained = route(lb)
    assert explained["weights"] == {"b1": 0.2, "b2": 0.8}
    assert explained["pick_shares"] == {"b1": 0.2, "b2": 0.8}  # smooth WRR: exact over 4000 picks
    assert explained["backend"] == "b2" and "weighted_round_robin" in explained["why"]
    assert "learned table" not in explained["why"] and "mode" not in explained


def test_least_connections_and_p2c_count_weights(lb_factory, backend_factory, monkeypatch):
    # No traffic: equal in-flight (0) and equal peak EWMA (the workers' prior) on both
    # backends, so the weight decides: the workers' strategies pick b2 (weight 4).
    lb = start(lb_factory, backend_factory, "least_connections", monkeypatch)
    explained = route(lb)
    assert explained["strategy"] == "least_connections"
    assert explained["loads"] == {"b1": 1.0, "b2": 0.25}
    assert explained["backend"] == "b2" and explained["pick_shares"] == {"b2": 1.0}
    assert api(lb, "GET", "/api/route")[1]["picks_by"]["rule"] == "fewest (in-flight + 1) / weight"
    pin(lb, "p2c_ewma")
    assert wait_until(lambda: route(lb)["strategy"] == "p2c_ewma", timeout=5)
    explained = route(lb)
    assert explained["backend"] == "b2" and explained["pick_shares"] == {"b2": 1.0}
    assert explained["scores"]["b1"] == 4 * explained["scores"]["b2"] > 0
    assert "ewma x (inflight+1) / weight" in explained["why"]
    assert "lb_policy_learned" not in families(lb)


def test_ml_explained_as_a_pick_by_cost(lb_factory, backend_factory, monkeypatch):
    lb = start(lb_factory, backend_factory, "ml", monkeypatch)
    lb.log.wait_for("inference_ready", timeout=30)

    def learned():
        for _ in range(10):
            get(lb.port, "/")
        r = api(lb, "GET", "/api/route")[1]
        return r["mode"] == "learned" and r["table"] is not None and r["table"]["mode"] == "learned"
    assert wait_until(learned, timeout=30, interval=0.1)
    fams = families(lb)
    assert fams["lb_policy_learned"].samples[0].value == 1
    assert fams["lb_backend_table_weight"].samples
    explained = route(lb)
    assert explained["mode"] == "learned"
    assert "picked by cost" in explained["why"] and "by weight" not in explained["why"]
    assert set(explained["costs"]) <= {"b1", "b2"} and explained["costs"]
    assert 0 < explained["exploration"] < 1
    assert abs(sum(explained["pick_shares"].values()) - 1) < 0.01
    assert explained["backend"] == max(explained["pick_shares"], key=explained["pick_shares"].get)
