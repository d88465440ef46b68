"""lb runs its own code, whatever the current directory holds.

`python -m workers` puts the current directory first on sys.path, so a child
started that way from a folder holding a `workers/` package runs that code; and
from a source checkout without the compiled extension it runs the checkout's
pure-Python workers instead of the installed ones.  Here lb is started for
real (`lb run`, through the console script and through `python -m lb`) from
such folders, and must serve through its backend with its own code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, LBRun, free_port
from tests.rawhttp import get

# Planted next to lb's own package names: lb's, and a few of its dependencies.
PLANTED = ("lb", "lb/admin", "workers", "inference", "msgspec", "zmq", "uvloop", "httptools")
ENTRY_PLANTS = {
    # The console script never puts the current directory on sys.path.
    "console_script": PLANTED,
    # `python -m lb` runs the current directory's `lb` by Python's own rule;
    # everything else must still be lb's.
    "python_m_lb": tuple(p for p in PLANTED if not p.startswith("lb")),
}


def console_script() -> str | None:
    path = os.path.join(sysconfig.get_path("scripts"), "lb")
    return path if os.access(path, os.X_OK) else shutil.which("lb")


def entry_argv(entry: str) -> list[str]:
    if entry == "console_script":
        script = console_script()
        if script is None:
            pytest.skip("the `lb` console script is not installed")
        return [script]
    return [sys.executable, "-m", "lb"]


def plant(folder: Path, markers: Path, packages) -> None:
    """Packages whose every module records that it ran (a `__main__` then exits)."""
    record = f"open({str(markers)!r} + '/' + __spec__.name, 'w').close()\n"
    for pkg in packages:
        d = folder / pkg
        d.mkdir(parents=True, exist_ok=True)
        (d / "__init__.py").write_text(record)
        (d / "__main__.py").write_text(record + "raise SystemExit(3)\n")


def write_config(path: Path, backend_address: str) -> tuple[Path, int, int]:
    port, admin_port = free_port(), free_port()
    path.write_text("\n".join([
        f'listen = "127.0.0.1:{port}"',
        "[admin]", f'listen = "127.0.0.1:{admin_port}"',
        "[[backends]]", 'name = "b1"', f'address = "{backend_address}"',
    ]) + "\n")
    return path, port, admin_port


class Started(LBRun):
    """`lb run` started with a given argv and current directory (not waited for)."""

    def __init__(self, argv: list[str], cwd: Path, config: Path, env: dict | None = None) -> None:
        super().__init__(config, argv=argv, cwd=cwd, env=env, wait=False)

    def wait(self, events: tuple[str, ...], give_up, timeout: float = 30.0) -> None:
        """Until every event is logged; fails at once when `give_up()` says why or lb exits."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [e for e in events if not self.log.events(e)]
            if not missing:
                return
            why = give_up()
            assert not why, why
            assert self.proc.poll() is None, (f"lb exited with {self.proc.returncode}:\n"
                                              + "\n".join(self.log.lines[-30:]))
            assert time.monotonic() < deadline, f"no {missing} in lb's log:\n" + "\n".join(self.log.lines[-30:])
            time.sleep(0.05)


@pytest.mark.parametrize("entry", sorted(ENTRY_PLANTS))
def test_planted_packages_never_run(tmp_path, backend_factory, entry):
    argv = entry_argv(entry)
    folder, markers = tmp_path / "cwd", tmp_path / "markers"
    folder.mkdir()
    markers.mkdir()
    plant(folder, markers, ENTRY_PLANTS[entry])
    # The trap is armed: Python's ordinary `-m` rule imports the planted code here.
    r = subprocess.run([sys.executable, "-m", "workers"], cwd=folder, capture_output=True)
    assert r.returncode == 3 and sorted(os.listdir(markers)) == ["workers", "workers.__main__"], r
    for name in os.listdir(markers):
        os.unlink(markers / name)

    backend = backend_factory("b1")
    config, port, admin_port = write_config(tmp_path / "lb.toml", backend.address)
    lb = Started(argv, folder, config)

    def planted_ran() -> str:
        ran = sorted(os.listdir(markers))
        return f"planted code ran: {ran}" if ran else ""

    try:
        lb.wait(("worker_ready", "inference_ready", "admin_ready"), planted_ran)
        status, headers, _ = get(port, "/isolated")
        assert status == 200 and headers.get("X-Backend") == "b1", (status, headers)
        assert any(r["target"] == "/isolated" for r in backend.requests())
        deadline = time.monotonic() + 15  # ready once the supervisor's first status came
        while get(admin_port, "/api/health")[0] != 200:
            assert time.monotonic() < deadline, "the admin API never said healthy"
            time.sleep(0.05)
    finally:
        lb.stop()
    assert lb.proc.returncode == 0, "\n".join(lb.log.lines[-30:])
    assert not planted_ran(), planted_ran()


def non_editable_env(tmp_path: Path) -> dict:
    """The environment of a regular (non-editable) install of this tree: its
    packages found on a plain sys.path entry, ROOT.  An editable install's
    import hook answers for every `workers.*` module wherever the `workers`
    package came from, which would hide a child importing the wrong tree."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(hooks)])}


def fastpath_in(cwd: Path, env: dict, *flags: str) -> str:
    """What `import workers.fastpath` gives in `cwd` (with `-P`: the installed package's)."""
    r = subprocess.run([sys.executable, *flags, "-c", "import workers.fastpath as f; print(f.AVAILABLE)"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    return r.stdout.strip() or r.stderr[-300:]


def test_children_run_the_installed_code_from_a_checkout(tmp_path, backend_factory):
    script = console_script()
    if script is None:
        pytest.skip("the `lb` console script is not installed")
    env = non_editable_env(tmp_path)
    installed = fastpath_in(tmp_path, env, "-P")
    if installed != "True":
        pytest.skip(f"the installed lb has no C fast path to lose ({installed})")

    # A checkout that was never compiled: lb's Python sources, no extension, no model.
    checkout = tmp_path / "checkout"
    for pkg in ("lb", "lb/admin", "workers", "inference"):
        (checkout / pkg).mkdir(parents=True)
        for src in (ROOT / pkg).glob("*.py"):
            shutil.copy(src, checkout / pkg / src.name)
    assert not list(checkout.rglob("*.so"))
    # The trap is armed: `python -m` from there would lose the fast path.
    assert fastpath_in(checkout, env) == "False"

    backend = backend_factory("b1")
    config, port, _ = write_config(tmp_path / "lb.toml", backend.address)
    lb = Started([script], checkout, config, env)
    try:
        lb.wait(("worker_ready", "inference_ready"), lambda: "")
        ready = lb.log.events("worker_ready")[0]
        assert ready["fastpath"] is True, ready
        loaded = lb.log.events("model_loaded")
        assert loaded and not loaded[0]["path"].startswith(str(checkout)), loaded
        assert get(port, "/")[0] == 200
    finally:
        lb.stop()
