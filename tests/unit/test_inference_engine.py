"""The inference Engine (I/O free) and model loading: fallbacks, weights, trace joins.

Stats come from `tests.synthetic.SyntheticWorker` (cumulative counters
exactly as workers send them); models are real ONNX files.
"""

from __future__ import annotations

import numpy as np
import pytest

from inference import policy
from inference.engine import Engine
from inference.features import FEATURES, N_FEATURES
from inference.model import DEFAULT_MODEL, Model, ModelError
from lb.core.messages import Control
from tests import synthetic
from tests.models import constant_model


def rows_ok(table, live_mask=None) -> None:
    w = np.array(table.weights)
    assert w.shape == (len(table.classes), len(table.backends))
    assert np.allclose(w.sum(axis=1), 1.0)
    assert (w >= 0).all()


# -- model files -------------------------------------------------------------------------------------------


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelError, match=r"nope\.onnx: no such model file"):
        Model.load(str(tmp_path / "nope.onnx"))


def test_not_onnx(tmp_path):
    p = tmp_path / "garbage.onnx"
    p.write_bytes(b"this is not a model\n" * 10)
    with pytest.raises(ModelError, match=r"garbage\.onnx: not a valid ONNX model"):
        Model.load(str(p))


def test_wrong_features_inputs_outputs(tmp_path):
    other = FEATURES[1:] + FEATURES[:1]  # same names, other order
    with pytest.raises(ModelError, match="feature list mismatch"):
        Model.load(constant_model(tmp_path / "a.onnx", 0.01, 0.0, features=other))
    with pytest.raises(ModelError, match="expected one input named X"):
        Model.load(constant_model(tmp_path / "b.onnx", 0.01, 0.0, input_name="features"))
    with pytest.raises(ModelError, match="expected outputs 'latency' and 'error'"):
        Model.load(constant_model(tmp_path / "c.onnx", 0.01, 0.0, outputs=("lat_out", "err_out")))
    with pytest.raises(ModelError, match=r"shape"):
        Model.load(constant_model(tmp_path / "d.onnx", 0.01, 0.0, features=FEATURES + ("extra",)))
    m = Model.load(constant_model(tmp_path / "ok.onnx", 0.02, 0.1, version="v7"))
    lat, err = m.predict(np.zeros((5, N_FEATURES), np.float32))
    assert m.version == "v7" and np.allclose(lat, 0.02) and np.allclose(err, 0.1)


def test_shipped_model_loads():
    m = Model.load(DEFAULT_MODEL)
    assert m.features == FEATURES and m.version
    lat, err = m.predict(np.zeros((8000, N_FEATURES), np.float32))
    assert lat.shape == err.shape == (8000,) and (lat > 0).all() and ((0 <= err) & (err <= 1)).all()


# -- fallbacks ----------------------------------------------------------------------------------------------


def test_no_model_is_fallback_model_error_and_routing_continues():
    cfg = synthetic.config()
    e = Engine(cfg, None, now=0.0, model_error="/x/m.onnx: no such model file")
    w = synthetic.SyntheticWorker(synthetic.DEMO_LIKE, cfg.class_names)
    table = synthetic.run(e, w, 1.0)
    assert (table.mode, table.reason, table.model_version) == ("fallback", "model_error", "")
    rows_ok(table)
    events = e.take_events()
    assert [ev for ev, _ in events] == ["policy_mode"]  # logged once, on the change
    assert events[0][1]["error"] == "/x/m.onnx: no such model file"


def test_warming_up_then_learned(tmp_path):
    cfg = synthetic.config()
    e = Engine(cfg, Model.load(DEFAULT_MODEL), now=0.0)
    t0 = e.tick(0.1, 1, 1)
    assert (t0.mode, t0.reason) == ("fallback", "warming_up")
    rows_ok(t0)
    w = synthetic.SyntheticWorker(synthetic.DEMO_LIKE, cfg.class_names, start=0.1)
    table = synthetic.run(e, w, 5.0, start=0.1, seq=1)
    assert (table.mode, table.reason) == ("learned", "")
    assert table.model_version == Model.load(DEFAULT_MODEL).version
    assert 0 <= table.prediction_error < cfg.learning.max_prediction_error
    assert len(table.latency) == len(table.error) == len(cfg.class_names)
    modes = [f["mode"] for ev, f in e.take_events() if ev == "policy_mode"]
    assert modes == ["fallback", "learned"]


def test_low_confidence_with_a_model_that_predicts_badly(tmp_path):
    cfg = synthetic.config(max_prediction_error=0.8)
    bad = Model.load(constant_model(tmp_path / "bad.onnx", 5.0, 0.0))  # 5 s for ~5 ms answers
    e = Engine(cfg, bad, now=0.0)
    w = synthetic.SyntheticWorker(synthetic.DEMO_LIKE, cfg.class_names)
    table = synthetic.run(e, w, 3.0)
    assert (table.mode, table.reason) == ("fallback", "low_confidence")
    assert table.prediction_error > 3.0  # |ln(0.005 / 5)| is about 7
    rows_ok(table)
    # a good model swapped in starts a fresh track record and takes over
    e.set_model(Model.load(DEFAULT_MODEL))
    table = synthetic.run(e, w, 5.0, start=3.0, seq=30)
    assert table.mode == "learned"


# -- weights ------------------------------------------------------------------------------------------------


def test_weights_floor_soft_and_errors_weigh_heavily():
    exploration = 0.05
    # backend 0 good, 1 twice as slow, 2 fails fast (80% in 0.3 ms), 3 drained
    lat = np.array([[0.004, 0.008, 0.0003, 0.001]])
    err = np.array([[0.0, 0.0, 0.8, 0.0]])
    live = np.array([True, True, True, False])
    w = policy.weights(lat, err, live, exploration)[0]
    assert np.isclose(w.sum(), 1.0) and w[3] == 0.0
    share = w
    floor = exploration / 3
    assert (share[:3] >= floor - 1e-12).all()
    assert share[2] < floor + 0.001  # the fast failure gets (almost) only the exploration floor
    assert share[0] > share[1] > share[2]
    assert share[0] < 1 - floor  # never all-in
    assert 3.0 < (share[0] - floor) / (share[1] - floor) < 5.0  # soft: 2x slower -> ~1/4 of the share


def test_errors_are_priced_by_the_prediction_shrunk_towards_the_record():
    predicted = np.array([[0.3, 0.3, 0.3]])
    observed = np.array([[0.0, 0.0, 0.9]])
    answers = np.array([[2000.0, 0.0, 2000.0]])
    priced = policy.shrink(predicted, observed, answers)[0]
    # many answers: the record (a backend that answers everything, one that fails
    # 90%); none: the prediction; a prediction weighs as PRIOR_ANSWERS answers
    assert priced[0] < 0.003 and priced[1] == pytest.approx(0.3) and priced[2] > 0.89
    half = policy.shrink(predicted, observed, np.full((1, 3), policy.PRIOR_ANSWERS))[0]
    assert half[0] == pytest.approx(0.15)


def test_a_class_a_backend_is_rarely_sent_is_priced_by_its_record_for_the_others():
    """The model predicts 30% errors everywhere.  Backend 0 answers thousands of
    light requests and no heavy one (the pick keeps heavy requests elsewhere):
    its heavy cell is priced by its light record, not by the prediction, or
    the prediction would keep it away for good.  Backend 1 fails 90% of its
    light requests: its heavy cell inherits that.  Backend 2 has no answers:
    the prediction."""
    predicted = np.full((2, 3), 0.3)
    observed = np.array([[0.0, 0.9, 0.0], [0.0, 0.0, 0.0]])
    answers = np.array([[3000.0, 3000.0, 0.0], [0.0, 0.0, 0.0]])
    light, heavy = policy.shrink(predicted, observed, answers)
    assert light[0] < 0.003 and light[1] > 0.89
    assert heavy[0] < 0.003 and heavy[1] > 0.89 and heavy[2] == pytest.approx(0.3)
    # one class only: a cell's own record is not counted twice
    one = policy.shrink(predicted[:1], observed[:1], np.full((1, 3), policy.PRIOR_ANSWERS))[0]
    assert one[0] == pytest.approx(0.15)


def test_a_model_predicting_errors_for_healthy_busy_backends_does_not_price_them_up(tmp_path):
    """The table's cost over latency is the error penalty the workers price by: with
    the record of hundreds of successful answers, a constant 30% prediction
    leaves a busy backend's cost within 30% of its latency.  (Its latency
    is wrong too: the confidence check is off, so the table stays learned.)"""
    cfg = synthetic.config(max_prediction_error=1000.0)
    e = Engine(cfg, Model.load(constant_model(tmp_path / "m.onnx", 0.005, 0.3)), now=0.0)
    w = synthetic.SyntheticWorker(synthetic.DEMO_LIKE, cfg.class_names, rate=2000, seed=3)
    table = synthetic.run(e, w, 3.0)
    assert table.mode == "learned"
    ratio = np.array(table.cost) / np.array(table.latency)
    busy = [table.backends.index(n) for n in ("fast", "medium")]
    # the default class, most of the traffic: priced by the record, not by the
    # prediction's (1 - 0.3) ** -8 = 17
    assert (ratio[0, busy] < 1.3).all() and (ratio[0, busy] >= 1.0).all(), ratio
    failing = table.backends.index("failing")  # its record says it fails: it stays dear
    assert (ratio[:, failing] > 5).all(), ratio


def test_drained_and_down_backends_get_zero(tmp_path):
    cfg = synthetic.config()
    e = Engine(cfg, Model.load(DEFAULT_MODEL), now=0.0)
    w = synthetic.SyntheticWorker(synthetic.DEMO_LIKE, cfg.class_names)
    synthetic.run(e, w, 2.0)
    e.set_control(Control(epoch=1, seq=1, ts=0.0, drained=["fast"], down=["slow"]))
    table = synthetic.run(e, w, 1.0, start=2.0, seq=20)
    weights = np.array(table.weights)
    for name in ("fast", "slow"):
        assert (weights[:, table.backends.index(name)] == 0).all()
    rows_ok(table)
    e.set_control(Control(epoch=1, seq=2, ts=0.0, down=["fast", "slow", "medium", "failing"]))
    table = synthetic.run(e, w, 0.2, start=3.0, seq=40)
    assert (table.mode, table.reason) == ("fallback", "no_live_backend")
    rows_ok(table)


def test_learned_routing_avoids_the_failing_backend():
    # (the synthetic worker routes by the tables' weights: what the engine
    # learns of the failing backend comes through the exploration share, 2% here)
    cfg = synthetic.config(exploration=0.02)
    e = Engine(cfg, Model.load(DEFAULT_MODEL), now=0.0)
    w = synthetic.SyntheticWorker(synthetic.DEMO_LIKE, cfg.class_names, rate=300, seed=5)
    table = synthetic.run(e, w, 10.0)
    assert table.mode == "learned"
    weights = np.array(table.weights)
    fast, failing = table.backends.index("fast"), table.backends.index("failing")
    assert (weights[:, failing] < 0.02).all()
    slow = table.backends.index("slow")
    assert (weights[:, fast] > 0.25).all() and (weights[:, fast] > 2 * weights[:, slow]).all()
    # the worker's pick sends little to it: 80% of its answers fail, under 3% of all fail
    routed = np.array(w.routed)
    assert routed[failing] / routed.sum() < 0.04
    lat = np.array(table.latency)
    assert (np.array(table.error)[:, failing] > 0.3).all()
    assert lat[0, table.backends.index("slow")] > lat[0, fast]


# -- traces -------------------------------------------------------------------------------------------------


def test_trace_samples_join_the_features_of_their_table():
    cfg = synthetic.config()
    e = Engine(cfg, None, now=0.0)
    w = synthetic.SyntheticWorker(synthetic.DEMO_LIKE, cfg.class_names, sample=1.0)
    synthetic.run(e, w, 2.0)
    rec = e.take_records()
    assert rec is not None and len(rec["latency"]) > 100
    assert rec["features"].shape == (len(rec["latency"]), N_FEATURES)
    assert set(rec["backend"]) <= set(cfg_b.name for cfg_b in cfg.backends)
    # every joined row is a row of a table the engine published
    kept = np.concatenate(list(e.tables.values()))
    some = rec["features"][-50:]
    assert all((kept == row).all(axis=1).any() for row in some)
    assert e.take_records() is None  # taken once
    # samples stamped with an unknown table are counted, not joined
    st = w.report(2.1)
    for s in st.traces:
        s.table_seq = 10**9
    e.ingest(st, 2.1)
    assert e.take_records() is None and e.unjoined > 0
