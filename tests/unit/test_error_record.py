"""Whose error prediction prices the picks (inference/policy.py `ErrorRecord`):
the model's or the cells' own record, per backend, by how well each foretold
the failures that followed."""

from __future__ import annotations

import numpy as np
import pytest

from inference import policy
from inference.engine import Engine
from inference.model import Model
from tests import synthetic
from tests.models import constant_model


def ticks(record, predicted, observed, answers, attempts, errors, n=10, dt=0.1):
    """`n` ticks: price, then judge against what the cells did meanwhile."""
    for _ in range(n):
        priced = record.price(predicted, observed, answers)
        record.observe(attempts, errors, dt)
    return priced


def test_small_error_predictions_for_backends_that_fail_nothing_lose_their_weight():
    """A 2% prediction beside twenty answers still prices a 2 ms backend as if a
    failure (a second) were 1% likely: 10 ms more.  A few ticks of answers that
    all succeed take the model's weight away, and the record prices them."""
    record = policy.ErrorRecord()
    predicted = np.full((1, 2), 0.02)
    observed = np.zeros((1, 2))
    answers = np.full((1, 2), policy.PRIOR_ANSWERS)
    first = record.price(predicted, observed, answers)
    assert first == pytest.approx(np.full((1, 2), 0.005))  # equal odds to begin with
    priced = ticks(record, predicted, observed, answers, np.full((1, 2), 100.0), np.zeros((1, 2)))
    assert (record.trust() < 0.01).all()
    assert (priced < 5e-5).all()


def test_a_model_that_foretells_failures_earns_its_weight_there_and_on_the_fleet():
    """Backend 1 starts failing half its requests before its record shows it;
    the model says so, and earns its weight there.  Backend 0 answers
    everything, and the model says that too: the two agree there, and the
    model's weight there comes from the fleet's record (backend 1's)."""
    record = policy.ErrorRecord()
    predicted = np.array([[0.0, 0.5]])
    observed = np.zeros((1, 2))
    answers = np.full((1, 2), 2.0)  # few answers yet: the prediction weighs
    ticks(record, predicted, observed, answers, np.array([[100.0, 100.0]]), np.array([[0.0, 50.0]]), n=3)
    trust = record.trust()
    assert trust[0] > 0.99 and trust[1] > 0.99
    priced = record.price(predicted, observed, answers)
    assert priced[0, 1] > 0.4
    assert priced[0, 0] == 0.0


def test_a_backends_weight_counts_the_whole_fleets_record():
    """The model says 2% everywhere.  Backend 0 has answered a lot and failed
    nothing; backend 1 is seldom sent anything: its own record is thin, but
    the fleet's says the model's small error predictions are wrong here, and
    it loses its weight on backend 1 too."""
    record = policy.ErrorRecord()
    predicted = np.full((1, 2), 0.02)
    observed, answers = np.zeros((1, 2)), np.full((1, 2), 2.0)
    ticks(record, predicted, observed, answers, np.array([[200.0, 0.5]]), np.zeros((1, 2)))
    own_only = 1.0 / (1.0 + np.exp(record.margin))  # each backend judged by its own record alone
    assert own_only[1] > 0.4  # backend 1's own record would have left it about half
    assert (record.trust() < 0.01).all()


def test_the_record_fades_and_a_new_fleet_starts_afresh():
    record = policy.ErrorRecord()
    predicted = np.full((1, 2), 0.02)
    observed, answers = np.zeros((1, 2)), np.full((1, 2), 20.0)
    ticks(record, predicted, observed, answers, np.full((1, 2), 100.0), np.zeros((1, 2)))
    assert (record.trust() < 0.01).all()
    # nothing priced for a while (a fallback): the margin decays towards equal odds
    record.pred = None
    for _ in range(300):
        record.observe(np.zeros((1, 2)), np.zeros((1, 2)), 0.1)
    assert (record.trust() > 0.4).all()
    # three backends now: the old record does not apply
    record.margin = np.array([30.0, 30.0])
    record.price(np.full((1, 3), 0.02), np.zeros((1, 3)), np.full((1, 3), 20.0))
    assert np.shape(record.trust()) == ()


def test_the_engine_prices_by_the_record_once_the_models_errors_are_judged(tmp_path):
    """A model predicting 2% errors everywhere, on a fleet where only one backend
    fails (80%): after a few seconds the healthy backends' cost is their
    latency, and the failing one is priced by its record.  (On the busy healthy
    backends the two prices differ by little, their records being long: the
    model loses weight there too, but slowly.)"""
    # (the synthetic worker routes by the tables' weights: the failing backend
    # is heard from through the exploration share, 2% here)
    cfg = synthetic.config(max_prediction_error=1000.0, exploration=0.02)
    e = Engine(cfg, Model.load(constant_model(tmp_path / "m.onnx", 0.005, 0.02)), now=0.0)
    w = synthetic.SyntheticWorker(synthetic.DEMO_LIKE, cfg.class_names, rate=2000, seed=3)
    table = synthetic.run(e, w, 3.0)
    assert table.mode == "learned"
    trust = e.errors.trust()
    assert table.error_weight == pytest.approx(trust.tolist())  # published (/metrics, /api/table)
    assert (trust < 0.5).all(), trust
    assert trust[table.backends.index("failing")] < 0.01, trust
    ratio = np.array(table.cost) / np.array(table.latency)
    healthy = [table.backends.index(n) for n in ("fast", "medium", "slow")]
    # below what the model's prediction alone (shrunk towards the record) would price
    model_only = (1.0 - e.errors.pred[0]) ** -(policy.ERROR_POWER / policy.LATENCY_POWER)
    assert (ratio[:, healthy] < model_only[:, healthy]).all(), (ratio, model_only)
    assert (ratio[:, healthy] < 1.01).all(), ratio
    failing = table.backends.index("failing")
    assert (ratio[:, failing] > 5).all(), ratio
