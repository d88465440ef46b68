"""bench/quality.py's proxy configs: lb's loads for every scenario; where a
backend joins late (it refuses connections until then), lb's outlier
ejection and nginx's max_fails are off, so that the joiner is found by the
strategies within the run instead of staying ejected past its end."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import quality_procs  # noqa: E402
import scenarios as scn  # noqa: E402

from lb.core.config import load  # noqa: E402


@pytest.mark.parametrize("name", sorted(scn.SCENARIOS))
def test_lb_config_loads_and_ejects_unless_a_backend_joins_late(name, tmp_path):
    sc = scn.SCENARIOS[name]
    ports = list(range(21001, 21001 + len(sc.backends)))
    path = tmp_path / "lb.toml"
    path.write_text(quality_procs.lb_config("ml", 18080, sc, ports, 1, 2.0))
    cfg = load(str(path))
    late = any(b.join_at > 0 for b in sc.backends)
    assert late == (name == "coldjoin")
    assert cfg.outlier.consecutive_failures == (0 if late else 5)
    assert [b.name for b in cfg.backends] == [b.name for b in sc.backends]
    servers = quality_procs.nginx_servers(sc, ports).splitlines()
    assert len(servers) == len(sc.backends)
    assert all(("max_fails=0" in line) == late for line in servers)
