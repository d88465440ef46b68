"""bench/fleet_bench.py's pure parts: the configs it gives its members are valid
lb configs (with and without `[fleet]`), and the new member gets no request
before it joins, then its share."""

from __future__ import annotations

import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import fleet_bench  # noqa: E402
import scenarios as scn  # noqa: E402

from lb.core.config import load  # noqa: E402


def test_member_configs_load(tmp_path):
    sc = scn.get("affinity")
    args = fleet_bench.parse_args(["--duration", "30", "--retrain", "4", "--sample", "0.25"])
    ports = list(range(20001, 20001 + len(sc.backends)))
    for etcd_url, retrain in ((None, 0.0), ("http://127.0.0.1:2379", 4.0)):
        path = tmp_path / f"m-{retrain}.toml"
        path.write_text(fleet_bench.member_config(2, 18080, 19900, sc, ports, args, str(tmp_path / "s"),
                                                  etcd_url, retrain))
        cfg = load(str(path))
        assert cfg.strategy == "ml" and cfg.learning.retrain_interval == retrain
        assert cfg.learning.trace_sample == 0.25
        assert [b.name for b in cfg.backends] == [b.name for b in sc.backends]
        assert cfg.fleet.etcd == ([etcd_url] if etcd_url else [])
        if etcd_url:
            assert cfg.fleet.member == "m2" and cfg.fleet.prefix == fleet_bench.PREFIX


def test_the_new_member_gets_traffic_only_from_its_join():
    schedule = [(i * 0.01, 0) for i in range(3000)]  # 30 s
    parts = fleet_bench.deal(schedule, 15.0, seed=3)
    assert sorted(a for p in parts for a in p) == schedule
    assert parts[2] and min(a[0] for a in parts[2]) >= 15.0
    after = [sum(1 for a in p if a[0] >= 15.0) for p in parts]
    assert all(abs(n / 1500 - 1 / 3) < 0.05 for n in after), after
    assert fleet_bench.deal(schedule, 15.0, seed=3) == parts  # seeded
