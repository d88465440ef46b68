"""inference/twin.py: the fleet read from trace records, and a model judged
by the routing it gives in a simulated copy of it."""

from __future__ import annotations

import numpy as np
import pytest

from inference import twin
from inference.engine import Engine
from inference.model import DEFAULT_MODEL, Model
from tests import synthetic
from tests.models import inverted_model

FLEET = [
    synthetic.SynthBackend("fast", capacity=8, service=0.005),
    synthetic.SynthBackend("slow", capacity=8, service=0.03),
    synthetic.SynthBackend("failing", capacity=8, service=0.004, fail_rate=0.5),
]


@pytest.fixture(scope="module")
def records():
    """Joined records of 12 s at 300 requests/s, half of them sampled, routed at random."""
    cfg = synthetic.config(FLEET)
    e = Engine(cfg, None, now=0.0)
    w = synthetic.SyntheticWorker(FLEET, cfg.class_names, rate=300, sample=0.5, seed=5)
    synthetic.run(e, w, 12.0)
    return e.take_records()


def test_the_fleet_is_read_from_the_records(records):
    fleet = twin.describe(records, 0.5)
    assert fleet.rate == pytest.approx(300, rel=0.15)
    assert fleet.classes == ["default", "heavy"]
    assert fleet.mix[1] == pytest.approx(0.25, abs=0.05)
    by = {b.name: b for b in fleet.backends}
    assert set(by) == {"fast", "slow", "failing"}
    # the light class's service time, and the heavy class's cost (x3 in the synthetic fleet)
    assert by["fast"].service[0] == pytest.approx(0.005, rel=0.25)
    assert by["slow"].service[0] == pytest.approx(0.03, rel=0.25)
    assert by["slow"].service[1] / by["slow"].service[0] == pytest.approx(3.0, rel=0.3)
    assert by["failing"].fail == pytest.approx(0.5, abs=0.08)
    assert by["fast"].fail == 0.0
    assert all(b.slots >= 1 for b in fleet.backends)


def test_too_few_records_is_an_error_not_a_verdict(records):
    few = {k: v[:20] for k, v in records.items()}
    with pytest.raises(twin.TwinError, match="20 records"):
        twin.describe(few, 0.5)
    with pytest.raises(twin.TwinError, match="sample"):
        twin.describe(records, 0.0)


def test_a_model_that_would_route_worse_does_not_pass(records, tmp_path):
    # two backends, the fast one at 5 ms; the inverted model predicts it fails
    # every request, and with its error predictions always counted the pick
    # sends most requests to the slow one (tests/process/test_guard_lb.py)
    two = [b for b in FLEET if b.name != "failing"]
    cfg = synthetic.config(two)
    e = Engine(cfg, None, now=0.0)
    w = synthetic.SyntheticWorker(two, cfg.class_names, rate=300, sample=0.5, seed=6)
    synthetic.run(e, w, 12.0)
    fleet = twin.describe(e.take_records(), 0.5)
    good = Model.load(DEFAULT_MODEL)
    liar = Model.load(inverted_model(tmp_path / "inverted.onnx"))
    always = {"model_errors": "always"}
    v = twin.judge(good, liar, fleet, seed=3, learning=always)
    assert not v.passed
    assert v.challenger.p99 > v.live.p99 * (1 + twin.MARGIN)
    assert v.fields()["twin_requests"] == v.live.requests > 1000
    assert twin.judge(liar, good, fleet, seed=3, learning=always).passed  # the other way round: better
    # the same model twice: the same traffic, the same routing, the same figures
    same = twin.judge(good, good, fleet, seed=3)
    assert same.passed and same.live == same.challenger


def test_the_copy_routes_the_records_rate(records):
    fleet = twin.describe(records, 0.5)
    out = twin.route(fleet, Model.load(DEFAULT_MODEL), seed=1)
    expect = min(twin.MAX_REQUESTS, fleet.rate * twin.MAX_SECONDS)
    assert out.requests == pytest.approx(expect, rel=0.1)
    # the failing backend fails half of what it gets, and ml sends it little
    assert 0.0 < out.error_rate < 0.5 / 3
    assert np.isfinite(out.p99) and out.p99 > 0.005
