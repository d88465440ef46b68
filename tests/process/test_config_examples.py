"""The example configs in configs/ are valid, and configs/lb.toml shows every key."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import msgspec
import pytest

from lb.core import config as cfgmod
from tests.conftest import ROOT

EXAMPLES = sorted((ROOT / "configs").rglob("*.toml"))


def _with_test_certificates(path, folder):
    """The example with its /etc/lb/tls/... files made by a test CA under `folder`."""
    from tests.tlsutil import CertAuthority

    text = path.read_text()
    ca = CertAuthority(folder)
    for stem in sorted(set(re.findall(r'"/etc/lb/tls/([a-z-]+)\.pem"', text))):
        if stem.endswith("-key"):
            continue
        if stem.endswith("ca"):
            (folder / f"{stem}.pem").write_bytes(open(ca.ca_file, "rb").read())
        else:
            ca.issue(f"{stem}.example.com", stem=stem)
    out = folder / path.name
    out.write_text(text.replace("/etc/lb/tls/", f"{folder}/"))
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_config_passes_lb_check(path, tmp_path):
    if "/etc/lb/tls/" in path.read_text():
        path = _with_test_certificates(path, tmp_path)
    r = subprocess.run([sys.executable, "-m", "lb", "check", "-c", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_one_example_per_strategy():
    names = {p.stem for p in (ROOT / "configs" / "strategies").glob("*.toml")}
    assert names == set(cfgmod.STRATEGIES)
    for name in names:
        cfg = cfgmod.load(str(ROOT / "configs" / "strategies" / f"{name}.toml"))
        assert cfg.strategy == name


def _keys(struct_type) -> set[str]:
    return set(struct_type.__struct_fields__)


def test_reference_config_lists_every_key():
    data = tomllib.loads((ROOT / "configs" / "lb.toml").read_text())
    cfg = cfgmod.Config
    missing = []
    for field in _keys(cfg) - {"backends", "classes"}:
        if field not in data:
            missing.append(field)
    for section in ("admin", "timeouts", "limits", "upstream", "balancer", "health", "outlier",
                    "protection", "learning", "access_log", "tls", "capacity", "discovery", "fleet"):
        sub = msgspec.inspect.type_info(cfg).fields
        ftype = next(f.type for f in sub if f.name == section).cls
        for key in _keys(ftype) - set(data.get(section, {})):
            missing.append(f"{section}.{key}")
    assert missing == []
