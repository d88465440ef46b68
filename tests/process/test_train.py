"""`lb train` and the challenger-vs-live decision, with real (small) models."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from inference import traces, train
from tests import synthetic
from inference.engine import Engine
from inference.model import Model
from tests.models import constant_model


@pytest.fixture(scope="module")
def trace_data():
    """~3,000 joined records from the synthetic cluster (random routing)."""
    cfg = synthetic.config()
    e = Engine(cfg, None, now=0.0)
    w = synthetic.SyntheticWorker(synthetic.DEMO_LIKE, cfg.class_names, rate=400, sample=0.5, seed=11)
    synthetic.run(e, w, 15.0)
    return e.take_records()


def lb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lb", *args], capture_output=True, timeout=timeout)


def test_lb_train_writes_a_model_that_loads_deterministically(trace_data, tmp_path):
    d = tmp_path / "traces"
    d.mkdir()
    half = len(trace_data["latency"]) // 2
    traces.write(str(d), {k: v[:half] for k, v in trace_data.items()}, name="trace-1.npz")
    traces.write(str(d), {k: v[half:] for k, v in trace_data.items()}, name="trace-2.npz")
    r1 = lb("train", str(d), "-o", str(tmp_path / "a.onnx"), "--max-iter", "60")
    assert r1.returncode == 0, r1.stderr
    r2 = lb("train", str(d / "trace-1.npz"), str(d / "trace-2.npz"), "-o", str(tmp_path / "b.onnx"), "--seed", "0",
            "--max-iter", "60")
    assert r2.returncode == 0, r2.stderr
    a, b = Model.load(str(tmp_path / "a.onnx")), Model.load(str(tmp_path / "b.onnx"))
    assert a.version == b.version and a.version.startswith("mlp-")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert a.version.encode() in r1.stdout
    # it learned something: the fast-failing backend is predicted to fail, the slow one to be slow
    X, be = trace_data["features"], trace_data["backend"]
    lat, err = a.predict(X)
    assert err[be == "failing"].mean() > 0.5 > err[be == "fast"].mean() + 0.3
    assert np.median(lat[be == "slow"]) > 3 * np.median(lat[be == "fast"])


def test_onnx_export_matches_scikit_learn(trace_data, tmp_path):
    pipe, X, version = train.fit_pipeline(trace_data, seed=3, max_iter=40)
    blob = train.export(pipe, version, X.min(axis=0), X.max(axis=0))
    model = Model.from_bytes(blob)
    lat, err = model.predict(X[:500])
    ref = pipe.predict(X[:500])
    # the network fits the latency relative to the cell's recent mean; the graph adds it back
    ref_log = ref[:, 0] + X[:500, train.BASE_COLUMN]
    assert np.allclose(np.log(lat), np.clip(ref_log, np.log(1e-5), np.log(60.0)), atol=1e-4)
    assert np.allclose(err, np.clip(ref[:, 1], 0, 1), atol=1e-4)


@pytest.mark.parametrize("setup, message", [
    ("empty_dir", "no .npz trace files in this directory"),
    ("garbage", "not a trace file"),
    ("missing", "no such file or directory"),
    ("few", "too few trace records"),
])
def test_bad_trace_input_is_one_line_exit_2(setup, message, trace_data, tmp_path):
    if setup == "empty_dir":
        path = tmp_path / "empty"
        path.mkdir()
    elif setup == "garbage":
        path = tmp_path / "x.npz"
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif setup == "missing":
        path = tmp_path / "nothing-here"
    else:
        path = traces.write(str(tmp_path), {k: v[:10] for k, v in trace_data.items()}, name="few.npz")
    r = lb("train", str(path), "-o", str(tmp_path / "m.onnx"))
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("lb train: ") and message in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_evaluate_challenger_swaps_only_a_better_model(trace_data, tmp_path):
    older, heldout = train.split_recent(trace_data)
    assert heldout["ts"].min() >= older["ts"].max()  # the held-out part is the most recent
    good = Model.from_bytes(train.fit(older, seed=0, max_iter=60), "good")
    bad = Model.load(constant_model(tmp_path / "bad.onnx", 1.0, 0.5))
    assert train.score(good, heldout) < train.score(bad, heldout)
    assert train.evaluate_challenger(bad, good, heldout) is True
    assert train.evaluate_challenger(good, bad, heldout) is False
    # an equal model is not "better": no churn
    assert train.evaluate_challenger(good, good, heldout) is False
    assert train.evaluate_challenger(None, bad, heldout) is True  # nothing live yet


def test_a_model_from_elsewhere_is_judged_by_the_refits_child(trace_data, tmp_path):
    """`python -m inference.retrain --candidate`: the check a fleet member runs on
    the leader's model, held-out loss then the twin's routing, no fit."""
    inp = traces.write(str(tmp_path), trace_data, name="records.npz")
    older, _ = train.split_recent(trace_data)
    good = tmp_path / "good.onnx"
    good.write_bytes(train.fit(older, seed=0, max_iter=60))
    bad = constant_model(tmp_path / "bad.onnx", 1.0, 0.5, version="bad-1")

    def judge(live, candidate) -> dict:
        r = subprocess.run([sys.executable, "-m", "inference.retrain", "--input", inp, "--candidate", str(candidate),
                            "--live", str(live), "--sample", "0.5"], capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        return json.loads(r.stdout.decode().splitlines()[-1])

    adopt = judge(bad, good)
    assert adopt["swap"] is True and adopt["challenger"] < adopt["live"]
    # judged by routing too: the twin routed the fleet the records describe with each model
    assert adopt["twin_requests"] > 1000
    assert adopt["twin_challenger_p99_ms"] <= adopt["twin_live_p99_ms"] * 1.1
    decline = judge(good, bad)
    assert decline["swap"] is False and decline["challenger"] > decline["live"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "good.onnx", "records.npz"]  # nothing written
    # one of the two modes, or a one-line usage error
    r = subprocess.run([sys.executable, "-m", "inference.retrain", "--input", inp], capture_output=True, timeout=60)
    assert r.returncode == 2 and b"give one of --output" in r.stderr and b"Traceback" not in r.stderr


def subnormal_weights(blob: bytes) -> int:
    import onnx
    from onnx import numpy_helper

    count = 0
    for t in onnx.load_from_string(blob).graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32:
            count += int(((a != 0) & (np.abs(a) < np.finfo(np.float32).tiny)).sum())
    return count


def test_models_carry_no_subnormal_weights():
    """Weights that L2 drove into float32's subnormal range are exported as 0:
    x86 CPUs compute subnormals through a slow path (the shipped model scored
    1,000 x 8 rows 4x slower with 37 of them, for the same outputs).  A fit of
    the shipped model's trace makes some (63, with this seed)."""
    import os

    from inference.model import DEFAULT_MODEL

    trace = traces.read([os.path.join(os.path.dirname(DEFAULT_MODEL), "default-trace.npz")])
    assert subnormal_weights(train.fit(trace, seed=0, max_iter=200)) == 0
    with open(DEFAULT_MODEL, "rb") as f:
        assert subnormal_weights(f.read()) == 0
