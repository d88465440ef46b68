"""The Dockerfile cannot be built here (no Docker engine); check what can be
checked: it installs every package, runs as a non-root user, exposes the
ports of the config it ships, and its HEALTHCHECK command works against a
running lb (healthy when ready, failing when lb is gone)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

from tests.conftest import ROOT


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_installs_every_package_and_runs_unprivileged():
    ins = instructions()
    copies = [rest for op, rest in ins if op == "COPY"]
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for top in {p.split(".")[0] for p in packages}:
        assert any(c.split()[0] == top for c in copies), f"package {top} not copied"
    # a build stage with a C compiler makes the wheel; the runtime stage installs it
    stages = [i for i, (op, _) in enumerate(ins) if op == "FROM"]
    assert len(stages) == 2 and all("python:3.11" in ins[i][1] for i in stages)
    build, runtime = ins[stages[0]:stages[1]], ins[stages[1]:]
    assert any(op == "RUN" and "gcc" in rest for op, rest in build)
    assert ("RUN", "pip wheel --no-deps --wheel-dir /wheels .") in build
    assert ("COPY", "--from=build /wheels /wheels") in runtime
    install = next(rest for op, rest in runtime if op == "RUN" and "pip install" in rest)
    assert install.startswith("pip install /wheels/*.whl") and "fastpath.AVAILABLE" in install
    assert not any("gcc" in rest for op, rest in runtime)
    user = [rest for op, rest in runtime if op == "USER"]
    assert user and user[-1] not in ("root", "0")


def test_the_wheel_the_build_stage_makes_carries_the_fast_path(tmp_path):
    # What the build stage runs, here: the wheel must hold the compiled extension.
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--wheel-dir", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    import zipfile

    wheel = next(tmp_path.glob("lb-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("workers/_fastpath") and n.endswith(".so") for n in names), names


def test_exposed_ports_match_the_shipped_config():
    ins = instructions()
    copied = [rest.split() for op, rest in ins if op == "COPY" and rest.endswith("/etc/lb/lb.toml")]
    assert copied, "no config installed at /etc/lb/lb.toml"
    cfg = tomllib.loads((ROOT / copied[0][0]).read_text())
    exposed = {int(p) for op, rest in ins if op == "EXPOSE" for p in rest.split()}
    ports = {int(cfg["listen"].rsplit(":", 1)[1]), int(cfg["admin"]["listen"].rsplit(":", 1)[1])}
    assert ports == exposed
    assert cfg["listen"].startswith("0.0.0.0:") and cfg["admin"]["listen"].startswith("0.0.0.0:")
    entry = json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT"))
    cmd = json.loads(next(rest for op, rest in ins if op == "CMD"))
    assert entry + cmd == ["lb", "run", "-c", "/etc/lb/lb.toml"]


def test_healthcheck_command_against_a_running_lb(lb):
    ins = instructions()
    hc = next(rest for op, rest in ins if op == "HEALTHCHECK")
    argv = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert argv[:2] == ["python", "-c"]
    code = argv[2].replace("127.0.0.1:9900", f"127.0.0.1:{lb.admin_port}")
    assert re.search(r"/api/health", code)
    run = lambda: subprocess.run([sys.executable, "-c", code], timeout=10).returncode  # noqa: E731
    lb.log.wait_for("admin_ready", timeout=20)
    for _ in range(50):  # ready once the supervisor reported its workers
        if run() == 0:
            break
    assert run() == 0
    lb.stop()
    assert run() == 1
