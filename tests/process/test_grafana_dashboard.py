"""configs/grafana-dashboard.json: provisionable JSON whose every expression
names only metrics a live admin process exports."""

from __future__ import annotations

import json
import re

from tests.adminharness import ROOT, AdminProc, Feeder, wait_until

DASHBOARD = ROOT / "configs" / "grafana-dashboard.json"
METRIC = re.compile(r"\blb_[a-zA-Z0-9_]+")


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def expressions(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in panels(dash) for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict):
            exprs.append(q.get("query", ""))
    return exprs


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels(dash) if p["type"] != "row"]
    assert len(graphs) >= 20
    for p in graphs:
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"].strip() for t in p["targets"]), p["title"]
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "instance"}
    titles = " ".join(p["title"] for p in graphs).lower()
    for topic in ("share", "p99", "error", "policy", "model", "table", "in flight", "weights"):
        assert topic in titles, topic


def test_every_metric_in_exprs_is_exported():
    dash = json.loads(DASHBOARD.read_text())
    used = {m for e in expressions(dash) for m in METRIC.findall(e)}
    assert len(used) >= 30
    admin = AdminProc()
    feeder = Feeder(admin.runtime, [("fast", 1), ("slow", 2), ("flaky", 1)], ["default", "upload", "api"]).start()
    try:
        def exported() -> set[str]:
            text = admin.get("/metrics")[2].decode()
            return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
        names: set[str] = set()

        def complete() -> bool:  # every family appears once the feeder's stats, status and table arrived
            names.update(exported())
            return used <= names

        try:
            wait_until(complete, timeout=10)
        except AssertionError:
            pass
        missing = sorted(used - names)
        assert not missing, f"dashboard expressions name metrics lb does not export: {missing}"
    finally:
        feeder.stop()
        admin.cleanup()
