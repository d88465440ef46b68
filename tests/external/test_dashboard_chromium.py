"""The dashboard in a real headless Chromium (Debian package `chromium`),
driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
messages separated by NUL on fds 3 and 4), against a running admin process
fed with stats: no console errors or exceptions, live numbers on the page,
a drain through the page's own button, and a screenshot."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.etcdserver import Etcd
from tests.adminharness import TOKEN, AdminProc, Feeder, base_config, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package chromium)")


class DevTools:
    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="lb-chromium-")
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends on fds 3 (commands) and 4 (answers)
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
             f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "--window-size=1400,1100",
             "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def _read_message(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.from_chrome], [], [], left)
            if not r:
                return None
            chunk = os.read(self.from_chrome, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe")
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\0")
        return json.loads(raw)

    def call(self, method: str, timeout: float = 15.0, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self._read_message(deadline - time.monotonic())
            if m is None:
                break
            if m.get("id") == self.next_id:
                assert "error" not in m, (method, m["error"])
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)
        raise TimeoutError(f"no answer to {method}")

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            m = self._read_message(left)
            if m and "method" in m:
                self.events.append(m)

    def evaluate(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        out = []
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p["exceptionDetails"])[:300])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console.error: " + json.dumps(p.get("args"))[:300])
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append("log: " + p["entry"].get("text", "")[:300])
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, EOFError, TimeoutError, AssertionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)  # its own session: the helpers go with it
            self.proc.wait()
        for fd in (self.to_chrome, self.from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def env(tmp_path):
    # a member of a fleet, with another member registered in the same (real) etcd
    etcd = Etcd(tmp_path)
    etcd.put("/lb/dash/members/other-7", json.dumps({"id": "other-7", "listen": "10.0.0.7:8080",
                                                      "version": "0.9", "backends": 3, "rps": 12.5}))
    admin = AdminProc(base_config(fleet={"etcd": [etcd.url], "prefix": "/lb/dash", "member": "this-1"}))
    feeder = Feeder(admin.runtime, [("fast", 1), ("slow", 2), ("flaky", 1)], ["default", "upload", "api"]).start()
    wait_until(lambda: admin.get("/api/metrics")[2]["window"] >= 1.0, timeout=10)
    browser = DevTools()
    try:
        yield admin, feeder, browser
    finally:
        browser.close()
        feeder.stop()
        admin.cleanup()
        etcd.close()


def test_dashboard_live_in_chromium(env, tmp_path):
    admin, feeder, b = env
    target = b.call("Target.createTarget", url="about:blank")["targetId"]
    b.session = b.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    b.call("Runtime.enable")
    b.call("Log.enable")
    b.call("Page.enable")
    b.call("Page.navigate", url=admin.url + "/")

    # live numbers: at least three events rendered, every backend's row with a request rate
    def rendered():
        # (the navigation may still be under way: no body yet)
        n = b.evaluate("document.body ? Number(document.body.dataset.events || 0) : 0")
        return n >= 3 and n
    wait_until(rendered, timeout=15, interval=0.3)
    rows = b.evaluate("""Array.from(document.querySelectorAll('#backends tr')).map(
        tr => Array.from(tr.cells).map(td => td.textContent))""")
    by_name = {r[0]: r for r in rows}
    assert set(by_name) == {"fast", "slow", "flaky"}, rows
    assert float(by_name["fast"][3]) > 10  # req/s column
    assert by_name["fast"][1] == "up" and by_name["fast"][2].endswith("%")
    assert float(by_name["slow"][5]) > float(by_name["fast"][5])  # p99 ms: slow above fast
    assert float(by_name["flaky"][6]) > 0  # errors/s
    header = b.evaluate("""({mode: document.getElementById('mode').textContent,
        model: document.getElementById('model').textContent,
        health: document.getElementById('health').textContent,
        conn: document.getElementById('conn').textContent,
        strategy: document.getElementById('strategy').textContent})""")
    assert header == {"mode": "learned", "model": "test-model-7", "health": "ready", "conn": "live",
                      "strategy": "ml"}, header
    # the fleet: both members, this one marked, and the etcd session
    wait_until(lambda: len(b.evaluate("document.querySelectorAll('#members tr').length ? "
                                      "Array.from(document.querySelectorAll('#members tr')) : []")) == 2,
               timeout=10, interval=0.2)
    members = b.evaluate("""Array.from(document.querySelectorAll('#members tr')).map(
        tr => Array.from(tr.cells).map(td => td.textContent))""")
    assert members[0][:5] == ["other-7", "10.0.0.7:8080", "0.9", "12.5", "3"], members
    assert members[1][0] == "this-1 (this one)", members
    assert "etcd 127.0.0.1:" in b.evaluate("document.getElementById('fleet-note').textContent")
    # the charts drew something: some non-white pixels in the share chart
    inked = b.evaluate("""(() => { const c = document.getElementById('c-share');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i+3] > 0 && (d[i] < 200 || d[i+2] < 200)) n++;
        return n; })()""")
    assert inked > 500
    # the load/capacity chart drew the load line, and its note says what is known of capacity
    inked = b.evaluate("""(() => { const c = document.getElementById('c-cap');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i+3] > 0 && d[i] < 100) n++;
        return n; })()""")
    assert inked > 20  # (a few seconds of load: a short line)
    assert "capacity" in b.evaluate("document.getElementById('cap-note').textContent")

    # drain through the page's button: the token is asked once and kept in sessionStorage
    b.evaluate(f"window.prompt = () => {json.dumps(TOKEN)}")
    b.evaluate("document.querySelector('#backends tr[data-backend=slow] button').click()")
    wait_until(lambda: feeder.control.state is not None and feeder.control.state.drained == ["slow"], timeout=5)
    wait_until(lambda: b.evaluate(
        "document.querySelector('#backends tr[data-backend=slow]').cells[1].textContent") == "drained", timeout=5)
    assert b.evaluate(f"sessionStorage.getItem('lbAdminToken') === {json.dumps(TOKEN)}")
    assert "done" in b.evaluate("document.getElementById('msg').textContent")

    b.pump(0.5)
    assert b.problems() == []
    assert b.evaluate("document.getElementById('errors').textContent") == ""

    shot = tmp_path / "dashboard.png"
    data = base64.b64decode(b.call("Page.captureScreenshot", format="png")["data"])
    shot.write_bytes(data)
    assert shot.stat().st_size > 20_000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("LB_DASHBOARD_SCREENSHOT")
    if keep:  # e.g. LB_DASHBOARD_SCREENSHOT=/tmp/dashboard.png to look at it
        shutil.copy(shot, keep)
