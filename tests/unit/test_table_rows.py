"""TableStrategy.refresh builds its per-class rows with cached columns and
comprehensions (it runs on the worker's loop for every table), and the pick
scans them with an early exit.  Both are checked against plain rules: the
rows against a per-backend rule on tables with missing, extra, unavailable,
cost-less and latency-less backends; the pick against a full scan for the
least expected cost over the same candidates."""

from __future__ import annotations

import math
import random

import pytest

from lb.core import messages as m
from lb.core.config import Backend as BackendConfig
from workers import learned
from workers.backend import Backend
from workers.strategies import make_strategy


def weight_factor(s, b):
    """The fleet's mean configured weight over b's."""
    mean_w = (sum(max(x.weight, 0) for x in s.backends) or 1) / len(s.backends)
    return mean_w / max(b.weight, 1e-3)


def unknown_price(s, b):
    """A backend that has not answered: its peak EWMA over its relative weight."""
    return b.ewma * weight_factor(s, b) if not b.curve.seen else b.ewma


def typical(s, c):
    """Class c's typical service time: the geometric mean over the backends
    that answered it (None if none has)."""
    v = [x.curve.service[c] for x in s.backends if x.curve.service[c]]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else None


def dearer(s, b):
    """How much dearer than typical b is on the classes it answered (geometric
    mean of the ratios; 1 if it answered none)."""
    answered = [c for c in range(len(s.class_names)) if b.curve.service[c]]
    if not answered:
        return 1.0
    return math.exp(sum(math.log(b.curve.service[c] / typical(s, c)) for c in answered) / len(answered))


def floor_price(s, b, k):
    """The least price of a class b has not answered: the class's typical
    service, times how much dearer b is on what it answered, times its weight
    factor (0 if nobody answered the class)."""
    t = typical(s, k)
    return 0.0 if t is None else t * dearer(s, b) * weight_factor(s, b)


def bound(s, k, service, err):
    """The least a pick can cost: answered at its service, or failed at a
    failure's cost; before a table priced errors, the error is the worker's
    own share, anything from 0 to 1."""
    fail = s.fail_cost(k)
    if not s.priced:
        return min(service, fail)
    return (1.0 - err) * service + err * fail


def reference_rows(s, table):
    col = {name: i for i, name in enumerate(table.backends)}
    weights = dict(zip(table.classes, table.weights))
    default = weights.get("default") or (table.weights[0] if table.weights else [])
    lat = dict(zip(table.classes, table.latency))
    cost = dict(zip(table.classes, table.cost))
    rows = []
    for k, cname in enumerate(s.class_names):
        wrow = weights.get(cname, default)
        lrow = lat.get(cname) or lat.get("default") or []
        crow = cost.get(cname) or cost.get("default") or []
        err, prior, cands = [], [], []
        for b in s.backends:
            i = col.get(b.name)
            ok = i is not None and b.available
            priced = ok and i < len(lrow) and i < len(crow)
            p = max(lrow[i], 1e-6) if priced else unknown_price(s, b)
            # a class this worker has not seen b answer: no cheaper than the fleet's profile says
            prior.append(p if b.curve.service[k] else max(p, floor_price(s, b, k)))
            # the table's cost is its latency x (1 - error) ** -8
            err.append(1.0 - max(crow[i] / max(lrow[i], 1e-9), 1.0) ** -0.125 if priced else 0.0)
            if ok and i < len(wrow) and wrow[i] > 0:
                cands.append(b)
        price = {b.idx: bound(s, k, b.curve.service[k] or prior[b.idx], err[b.idx]) for b in cands}
        order = sorted(cands, key=lambda b: price[b.idx])
        rows.append((order, [price[b.idx] for b in order], err, prior))
    return rows


def backends(rng, classes):
    bs = [Backend(BackendConfig(address=f"127.0.0.1:{9000 + i}", name=f"b{i}", weight=rng.randint(1, 5)),
                  len(classes), i) for i in range(rng.randint(1, 12))]
    for b in bs:
        b.available = rng.random() > 0.2
        b.inflight = rng.randint(0, 5)
        b.ewma = rng.uniform(0.001, 0.05)
        b.failures = rng.choice((0, 0, 0, 2))
        b.err = rng.choice((0.0, 0.0, 0.3, 0.9))
    return bs


def teach(rng, s, now):
    """Random curves: some backends answered some classes, at various loads."""
    for b in s.backends:
        cv = b.curve
        for k in range(len(s.class_names)):
            if rng.random() < 0.6:
                cv.learn(k, rng.uniform(0.001, 0.08), rng.randint(0, 3), now)
        cv.slots = rng.choice((1.0, 2.0, 4.0))
        cv.work = b.inflight * rng.uniform(0.001, 0.05)
        cv.quiet_since = now - rng.uniform(0.0, 0.05)


def random_table(rng, s):
    names = [b.name for b in s.backends if rng.random() > 0.2] + ["gone"] * rng.randint(0, 2)
    rng.shuffle(names)
    tclasses = [c for c in s.class_names if rng.random() > 0.3] or ["default"]
    weights = [[rng.choice((0.0, rng.random())) for _ in names] for _ in tclasses]
    if rng.random() < 0.3:
        weights = [w[: rng.randint(0, len(w))] for w in weights]  # short rows
    latency = [] if rng.random() < 0.2 else [[rng.uniform(0.001, 0.05) for _ in names[: rng.randint(0, len(names))]]
                                             for _ in tclasses]
    cost = [] if rng.random() < 0.2 else [[rng.uniform(0.001, 0.2) for _ in names] for _ in tclasses]
    return m.Table(epoch=1, seq=1, ts=0.0, interval=0.1, model_version="t", mode="learned", reason="",
                   backends=names, classes=tclasses, weights=weights, latency=latency, cost=cost,
                   exploration=0.0)


@pytest.mark.parametrize("seed", range(40))
def test_rows_match_the_plain_rule(seed):
    rng = random.Random(seed)
    classes = ["default"] + [f"c{i}" for i in range(rng.randint(0, 3))]
    s = make_strategy("ml", backends(rng, classes), decay=10.0, seed=1, class_names=classes)
    now = 100.0
    s.clock = lambda: now
    for _ in range(3):  # successive tables: the column cache must follow a changed backend list
        teach(rng, s, now)
        table = random_table(rng, s)
        s.set_table(table)
        assert same_rows(s._rows, reference_rows(s, table))
        s.backends[rng.randrange(len(s.backends))].available ^= True
        s.refresh()
        assert same_rows(s._rows, reference_rows(s, table))


def profile_price(s, b, k):
    """Without a table, what backend b is expected to cost on class k by the
    fleet's profile: the class's typical service (geometric mean over the
    backends that answered it) times how much dearer than typical b is on the
    classes it answered (geometric mean of the ratios); a backend that has
    answered nothing: the class's typical service over its relative weight;
    a class nobody answered (or one class only): the unknown price."""
    n = len(s.class_names)
    if n < 2 or typical(s, k) is None:
        return unknown_price(s, b)
    if not any(b.curve.service[c] for c in range(n)):
        return typical(s, k) * weight_factor(s, b)
    return typical(s, k) * dearer(s, b)


def reference_own(s):
    """The worker's own rows (no table): the available backends by their
    service for the class, or, not answered yet, `profile_price`; no penalty."""
    rows = []
    for k in range(len(s.class_names)):
        prior = [profile_price(s, b, k) for b in s.backends]
        price = {b.idx: bound(s, k, b.curve.service[k] or prior[b.idx], 0.0) for b in s.backends}
        order = sorted((b for b in s.backends if b.available), key=lambda b: price[b.idx])
        rows.append((order, [price[b.idx] for b in order], [0.0] * len(s.backends), prior))
    return rows


def same_rows(got, want):
    for (o1, p1, e1, pr1), (o2, p2, e2, pr2) in zip(got, want, strict=True):
        assert o1 == o2 and e1 == pytest.approx(e2, abs=1e-12)
        assert p1 == pytest.approx(p2, rel=1e-9) and pr1 == pytest.approx(pr2, rel=1e-9)
    return True


@pytest.mark.parametrize("seed", range(20))
def test_own_rows_match_the_plain_rule(seed):
    rng = random.Random(500 + seed)
    classes = ["default"] + [f"c{i}" for i in range(rng.randint(0, 3))]
    s = make_strategy("ml", backends(rng, classes), decay=10.0, seed=1, class_names=classes)
    now = 100.0
    s.clock = lambda: now
    teach(rng, s, now)
    s.refresh()  # no table: the own rows are built
    assert s.table is None and same_rows(s._own, reference_own(s))
    s.backends[rng.randrange(len(s.backends))].available ^= True
    s.refresh()
    assert same_rows(s._own, reference_own(s))


def full_scan(s, cls, now, exclude=()):
    """The least expected cost over every candidate of the row, no early exit."""
    order, _, err, prior = s._rows[cls] if s.usable else s._own[cls]
    best, best_cost = None, 0.0
    for b in order:
        if not b.available or b in exclude:
            continue
        cv = b.curve
        # before any table priced errors, and on the worker's own rows, its own failure
        # share is priced instead
        e = err[b.idx] if s.usable and s.priced else b.err
        # the request's latency, and the wait it adds to those queued behind it (the
        # pick keeps an inline copy of Curve.externality)
        answered = (cv.expected(cls, b.inflight, prior[b.idx], now)
                    + cv.externality(cls, b.inflight, prior[b.idx]))
        c = (1.0 - e) * answered + e * s.fail_cost(cls)
        if b.failures:  # failures in a row: up to (n + 1)^2 times, never past a sure failure
            c = min(c * (b.failures + 1) ** 2, max(c, s.fail_cost(cls)))
        if best is None or c < best_cost:
            best, best_cost = b, c
    return best


@pytest.mark.parametrize("fail_cost", [1.0, 0.02])
@pytest.mark.parametrize("seed", range(40))
def test_the_early_exit_picks_what_a_full_scan_picks(seed, fail_cost, monkeypatch):
    # a failure's cost above every service, and among them (where a failure can
    # cost less than an answer)
    monkeypatch.setattr(learned, "FAIL_COST", fail_cost)
    rng = random.Random(1000 + seed)
    classes = ["default", "heavy"]
    s = make_strategy("ml", backends(rng, classes), decay=10.0, seed=1, class_names=classes)
    now = 50.0
    s.clock = lambda: now
    teach(rng, s, now)
    table = random_table(rng, s)
    s.set_table(table)
    s.check(0.0)  # the table's ts is 0: fresh at wall-clock 0
    for usable, priced in ((True, True), (False, True), (False, False)):
        # priced by the table; by the curves alone (after a table priced errors, and
        # before any did)
        s.usable, s.priced = usable, priced
        s.refresh()  # (as set_table does when a table first prices errors)
        for cls in range(2):
            for _ in range(5):
                for b in s.backends:  # the live state moves between refreshes
                    b.inflight = rng.randint(0, 6)
                    b.curve.work = b.inflight * rng.uniform(0.001, 0.05)
                if not (s._rows if usable else s._own)[cls][0]:
                    continue
                exclude = [b for b in s.backends if rng.random() < 0.2]
                assert s._table_pick(cls) is full_scan(s, cls, now)
                got = s._table_pick(cls, exclude)
                want = full_scan(s, cls, now, exclude)
                assert got is want or (want is None and got not in exclude)


def light_only_b2(weights):
    """Three backends with these configured weights: every one answered a
    light request at 5 ms, b0 and b1 a heavy one at 25 ms, b2 none."""
    bs = [Backend(BackendConfig(address=f"127.0.0.1:{9000 + i}", name=f"b{i}", weight=w), 2, i)
          for i, w in enumerate(weights)]
    s = make_strategy("ml", bs, decay=10.0, seed=1, class_names=["default", "heavy"])
    now = 10.0
    s.clock = lambda: now
    for b in bs:
        b.record(0, 0.005, False, now, 0)
    for b in bs[:2]:
        b.record(1, 0.025, False, now, 0)
    return bs, s


def test_a_class_not_answered_is_priced_by_the_fleets_class_costs():
    """No table: b2 has answered only light requests (as fast as the others'),
    the others answered heavy ones at 5x.  b2's heavy price is about 5x its
    light service, not its light latency, so a heavy request does not go to it
    while the others are free."""
    bs, s = light_only_b2(weights=(1, 1, 1))
    s.refresh()
    heavy = s._own[1]
    assert heavy[3][2] == pytest.approx(0.025)  # its prior for the class: the typical heavy cost
    assert s._table_pick(1) is not bs[2]


def test_with_a_table_a_class_not_answered_is_no_cheaper_than_the_fleets_profile():
    """b2 (configured weight 1, the others 4) has answered light requests only,
    as fast as the others; they answered heavy ones at 5x.  The table prices
    b2's heavy requests at its light latency (what the inference process
    fills a cell no worker saw answered with).  The pick prices them no lower
    than the heavy class's typical service times b2's weight factor
    (25 ms x 3 / 1), so heavy requests go to the others while they are free."""
    bs, s = light_only_b2(weights=(4, 4, 1))
    now = s.clock()
    table = m.Table(epoch=1, seq=1, ts=now, interval=0.1, model_version="t", mode="learned", reason="",
                    backends=["b0", "b1", "b2"], classes=["default", "heavy"],
                    weights=[[1 / 3] * 3, [1 / 3] * 3], latency=[[0.005] * 3, [0.025, 0.025, 0.005]],
                    cost=[[0.005] * 3, [0.025, 0.025, 0.005]], exploration=0.0)
    s.set_table(table)
    assert s.check(now) == (True, "")
    prior = s._rows[1][3]
    assert prior[:2] == pytest.approx([0.025, 0.025])  # (answered: the table's, their service rules anyway)
    assert prior[2] == pytest.approx(0.025 * 3)
    assert s._rows[0][3][2] == pytest.approx(0.005)  # answered here: the table's
    assert {s._table_pick(1) for _ in range(20)} <= {bs[0], bs[1]}
