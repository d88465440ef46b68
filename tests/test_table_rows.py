"""TableStrategy.refresh builds its per-class rows with cached columns and
comprehensions (it runs on the worker's loop for every table); it must give
exactly what the plain per-backend rule below gives, on tables with missing,
extra, unavailable and cost-less backends."""

from __future__ import annotations

import random
from itertools import accumulate

import pytest

from lb import messages as m
from lb.config import Backend as BackendConfig
from workers.balancer import Backend
from workers.strategies import make_strategy


def reference_rows(s, table):
    col = {name: i for i, name in enumerate(table.backends)}
    rows_by_name = dict(zip(table.classes, table.weights))
    default = rows_by_name.get("default") or (table.weights[0] if table.weights else [])
    costs_by_name = dict(zip(table.classes, table.cost)) if table.cost else {}
    default_cost = costs_by_name.get("default") or (table.cost[0] if table.cost else None)
    rows = []
    for cname in s.class_names:
        trow = rows_by_name.get(cname, default)
        crow = costs_by_name.get(cname, default_cost)
        weight, scaled = [], []
        for b in s.backends:
            i = col.get(b.name)
            ok = i is not None and i < len(trow) and b.available
            weight.append(trow[i] if ok else 0.0)
            if crow is not None and ok and i < len(crow):
                scaled.append(max(crow[i], 1e-9) / ((s._ref[b.idx] + 1.0) * max(s._ewma_ref[b.idx], 1e-6)))
            else:
                scaled.append(-1.0)
        cands = [b for b in s.backends if weight[b.idx] > 0]
        if any(scaled[b.idx] < 0 for b in cands):
            scaled = None
        cum = list(accumulate(weight[b.idx] for b in cands))
        rows.append((cands, cum, scaled, cum[-1] if cum else 0.0, weight))
    return rows


def comparable(rows):
    """A row with no candidates is never drawn from: its scaled costs do not matter."""
    return [(c, cum, scaled if c else None, top, w) for c, cum, scaled, top, w in rows]


@pytest.mark.parametrize("seed", range(40))
def test_rows_match_the_plain_rule(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    classes = ["default"] + [f"c{i}" for i in range(rng.randint(0, 3))]
    bs = [Backend(BackendConfig(address=f"127.0.0.1:{9000 + i}", name=f"b{i}"), len(classes), i)
          for i in range(n)]
    for b in bs:
        b.available = rng.random() > 0.2
        b.inflight = rng.randint(0, 5)
        b.ewma = rng.uniform(0.001, 0.05)
    s = make_strategy("ml", bs, decay=10.0, seed=1, class_names=classes)
    for _ in range(3):  # successive tables: the column cache must follow a changed backend list
        names = [b.name for b in bs if rng.random() > 0.2] + ["gone"] * rng.randint(0, 2)
        rng.shuffle(names)
        tclasses = [c for c in classes if rng.random() > 0.3] or ["default"]
        weights = [[rng.choice((0.0, rng.random())) for _ in names] for _ in tclasses]
        if rng.random() < 0.3:
            weights = [w[: rng.randint(0, len(w))] for w in weights]  # short rows
        cost = [] if rng.random() < 0.3 else [[rng.random() for _ in names[: rng.randint(0, len(names))]]
                                              for _ in tclasses]
        table = m.Table(epoch=1, seq=1, ts=0.0, interval=0.1, model_version="t", mode="learned", reason="",
                        backends=names, classes=tclasses, weights=weights, cost=cost, exploration=0.02)
        s.set_table(table)
        assert comparable(s._rows) == comparable(reference_rows(s, table))
        bs[rng.randrange(n)].available ^= True
        s.refresh()
        assert comparable(s._rows) == comparable(reference_rows(s, table))
