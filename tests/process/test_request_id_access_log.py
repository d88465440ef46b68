"""X-Request-Id (added when absent, passed through when present) and the
sampled, buffered access log."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.conftest import ROOT, free_port
from tests.rawhttp import RawConn, get


def request_ids(backend) -> list[list[str]]:
    return [[v for k, v in r["headers"] if k.lower() == "x-request-id"] for r in backend.requests()]


def test_request_id_added_when_absent_and_kept_when_present(lb, backend):
    backend.reset()
    for _ in range(3):
        assert get(lb.port, "/echo")[0] == 200
    assert get(lb.port, "/echo", headers={"X-Request-Id": "abc-123"})[0] == 200
    with RawConn(lb.port) as c:  # repeated: the first is kept, once
        c.send(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Request-Id: first\r\nX-Request-Id: second\r\n\r\n")
        assert c.read_response().status == 200
    # a request with a body takes the full path: it gets one too
    assert get(lb.port, "/echo", method="POST", body=b"x" * 10)[0] == 200
    ids = request_ids(backend)
    assert [len(i) for i in ids] == [1] * 6, ids
    generated = [ids[0][0], ids[1][0], ids[2][0], ids[5][0]]
    assert len(set(generated)) == 4  # unique
    assert ids[3] == ["abc-123"] and ids[4] == ["first"]


def test_request_id_can_be_turned_off(lb_factory, backend):
    lb = lb_factory([backend], extra="[upstream]\nrequest_id = false\n")
    backend.reset()
    get(lb.port, "/echo")
    get(lb.port, "/echo", headers={"X-Request-Id": "kept"})
    assert request_ids(backend) == [[], ["kept"]]


def read_log(path, n: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n or time.monotonic() > deadline:
            return [json.loads(x) for x in lines]
        time.sleep(0.05)


def test_access_log_records_every_request(lb_factory, backend, tmp_path):
    log = tmp_path / "access.log"
    lb = lb_factory([backend], workers=2, extra=f'[access_log]\npath = "{log}"\n')
    for i in range(20):
        assert get(lb.port, f"/echo?i={i}", headers={"X-Request-Id": f"r{i}"})[0] == 200
    assert get(lb.port, "/status/503")[0] == 503
    records = read_log(log, 21)
    assert len(records) == 21
    by_id = {r["request_id"]: r for r in records}
    r5 = by_id["r5"]
    assert r5["method"] == "GET" and r5["target"] == "/echo?i=5" and r5["status"] == 200
    assert r5["backend"] == "b1" and r5["client"] == "127.0.0.1" and r5["upstream_ms"] > 0
    assert sorted(r["status"] for r in records).count(503) == 1


def test_access_log_sampling(lb_factory, backend, tmp_path):
    log = tmp_path / "access.log"
    lb = lb_factory([backend], extra=f'[access_log]\npath = "{log}"\nsample = 0.1\n')
    for _ in range(300):
        get(lb.port, "/")
    assert lb.stop() == 0  # a worker that stops flushes its access log buffer
    n = len(read_log(log, 0, timeout=0))
    assert 10 <= n <= 60, n  # about 30


def test_unwritable_access_log_is_a_config_error(tmp_path, backend):
    cfg = tmp_path / "lb.toml"
    cfg.write_text(f'listen = "127.0.0.1:{free_port()}"\n[access_log]\npath = "{tmp_path}/no/such/a.log"\n'
                   f'[[backends]]\naddress = "{backend.address}"\n')
    for cmd in ("check", "run"):
        r = subprocess.run([sys.executable, "-m", "lb", cmd, "-c", str(cfg)], cwd=ROOT,
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 2, (cmd, r.stderr)
        assert f"{cfg}: access_log.path: cannot open" in r.stderr
        assert "Traceback" not in r.stderr
