"""The numpy pieces the `ml` pick's per-class rows are built from
(workers/learned.py `TableStrategy.refresh`): a table's row for each local
class (`class_rows`) and what it says of each of the worker's backends
(`table_view`), the candidates in price order (`by_price`), the
price of a class a backend has not answered, without a table (`own_prior`)
and the least a table may price it at (`weight_floor`), and the least cost
the pick can give a backend (`lower_bound`).
"""

from __future__ import annotations

import numpy as np

ERR_PRICE = 8.0  # the table's cost is its latency x (1 - e) ** -ERR_PRICE (inference/policy.py)


def table_view(table, cols: np.ndarray, names: list, unknown) -> tuple[np.ndarray, ...]:
    """What a table says of each (local class, backend), as (classes x
    backends) arrays: whether the backend is a candidate (in the table,
    available, weight > 0), its prior (the table's predicted latency, or
    `unknown` where the table has none) and its priced error (read back
    from the table's cost over its latency, (1 - error) ** -ERR_PRICE).
    `cols`: the table's column of each backend, -1 if absent or unavailable."""
    nt = max(len(table.backends), 1)  # (none: every backend is absent, cols -1)
    # the table row each local class reads: its own, else the default class's
    # (weights: else the first class's; latency and cost: an empty row is missing)
    w = class_rows(table.classes, table.weights, names, nt, 0.0, empty_counts=True)
    lat = class_rows(table.classes, table.latency, names, nt, np.nan)
    cost = class_rows(table.classes, table.cost, names, nt, np.nan)
    there = cols >= 0
    at = np.where(there, cols, 0)
    lv = lat[:, at]  # (classes, backends)
    cv = cost[:, at]
    in_l = there[None, :] & ~np.isnan(lv) & ~np.isnan(cv)
    prior = np.where(in_l, np.maximum(lv, 1e-6), np.array(unknown, dtype=np.float64)[None, :])
    penalty = np.where(in_l, np.maximum(cv / np.maximum(lv, 1e-9), 1.0), 1.0)
    err = 1.0 - penalty ** (-1.0 / ERR_PRICE)
    return there[None, :] & (w[:, at] > 0), prior, err


def own_prior(svc: np.ndarray, unknown: np.ndarray, factor: np.ndarray | None = None) -> np.ndarray:
    """The price of each (class, backend) without a table, (C, B), from the
    service times `svc` (0: not answered yet) and `unknown` (B,), the price
    of a backend that has answered nothing.  With `factor` (B,), the fleet's
    mean configured weight over the backend's, `unknown` prices only classes
    nobody has answered: a backend that has answered nothing is priced at
    the class's typical cost times its `factor`.  A class is typically
    exp(g[c]) dear (the mean log service of the backends that answered it);
    a backend is exp(rel[b]) times as dear as typical (its mean log ratio
    over the classes it answered).  A class a backend has not answered is
    priced at exp(g[c] + rel[b]): a backend known only by its light
    answers is not taken for cheap on the heavy class, which before the first
    table drew heavy requests to a backend that fails most of them fast (its
    peak EWMA is its light answers' latency)."""
    out = np.broadcast_to(unknown[None, :], svc.shape)
    if svc.shape[0] < 2 or not (svc > 0.0).any():
        return np.array(out)
    per_class, per_backend, g, rel = _profile(svc)
    est = np.exp(g[:, None] + rel[None, :])
    if factor is not None:
        typical = np.exp(g)[:, None] * factor[None, :]
        est = np.where((per_backend > 0)[None, :], est, typical)
        return np.where((per_class > 0)[:, None], est, out)
    return np.where((per_class > 0)[:, None] & (per_backend > 0)[None, :], est, out)


def weight_floor(svc: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """The least price a table may give a class a backend has not answered
    (from this worker), (C, B): the class's typical service time (the
    geometric mean over the backends that answered it; 0 where none has),
    times how much dearer than typical the backend is on the classes it did
    answer (1 if none), times `factor`, the fleet's mean configured weight
    over the backend's.  The table fills a cell no worker saw answered with
    the backend's latency over the classes it answered: a backend known by
    fast light answers looked cheap for heavy requests, and one the operator
    gave a small weight as cheap as any (development fleet 1022: 49 of 130
    backends 17x dearer on heavy requests than on light ones, weight 1
    against 3-10, each sent heavy requests after the first table)."""
    per_class, _per_backend, g, rel = _profile(svc)
    return np.where((per_class > 0)[:, None], np.exp(g[:, None] + rel[None, :]) * factor[None, :], 0.0)


def _profile(svc: np.ndarray) -> tuple[np.ndarray, ...]:
    """The fleet's profile from the service times `svc` (C, B; 0: not
    answered): answers per class and per backend, each class's mean log
    service `g` over the backends that answered it, and each backend's mean
    log ratio to it `rel` over the classes it answered (0 if none)."""
    known = svc > 0.0
    per_class = known.sum(axis=1)  # (C,)
    per_backend = known.sum(axis=0)  # (B,)
    logs = np.log(np.where(known, svc, 1.0))
    g = (logs * known).sum(axis=1) / np.maximum(per_class, 1)  # (C,)
    rel = np.where(known, logs - g[:, None], 0.0).sum(axis=0) / np.maximum(per_backend, 1)  # (B,)
    return per_class, per_backend, g, rel


def class_rows(classes: list, rows: list | np.ndarray, names: list, width: int, fill: float,
               empty_counts: bool = False) -> np.ndarray:
    """(len(names), width): for each local class name, the table row it reads,
    `fill` where that row is short or missing.  Its own class's row, else the
    default class's (`empty_counts`: an empty row of its own is its row; the
    default falls back to the first class's), else none."""
    out = np.full((len(names), width), fill, dtype=np.float64)
    if not len(rows) or not width:
        return out
    by_name = {c: i for i, c in enumerate(classes[:len(rows)])}
    default = by_name.get("default")
    if empty_counts:
        if default is None or not len(rows[default]):
            default = 0
    elif default is not None and not len(rows[default]):
        default = None
    pick = []
    for name in names:
        i = by_name.get(name)
        if i is None or (not empty_counts and not len(rows[i])):
            i = default
        pick.append(i)
    if isinstance(rows, np.ndarray):  # a worker's table (decode_table_arrays): no conversion
        full = rows[:, :width] if rows.shape[1] >= width else None
    elif all(len(r) >= width for r in rows):  # the usual table: one conversion
        full = np.array([r[:width] for r in rows], dtype=np.float64)
    else:
        full = None
    if full is not None:
        for k, i in enumerate(pick):
            if i is not None:
                out[k] = full[i]
        return out
    for k, i in enumerate(pick):
        if i is not None:
            r = rows[i][:width]
            out[k, :len(r)] = r
    return out


def by_price(objects: np.ndarray, price: np.ndarray, cand: np.ndarray) -> tuple[list, list, list]:
    """Per row of `price` (classes x backends): the candidates' objects and
    prices in price order, candidates first (a stable sort: ties keep the
    backends' order), as lists; and how many candidates each row has."""
    order = np.lexsort((price, ~cand), axis=-1)
    return (objects[order].tolist(), np.take_along_axis(price, order, axis=-1).tolist(),
            cand.sum(axis=1).tolist())


def lower_bound(price: np.ndarray, err: np.ndarray, fail: list[float], priced: bool) -> np.ndarray:
    """The least cost the pick can give each (class, backend) of the rows
    (workers/learned.py): answered at its service time (`price`) with the
    priced error's share failed at the class's `fail` cost.  The scan's early
    exit stops at the first backend whose bound is past the best cost so far.
    Until a table has priced errors (`priced` False) the pick prices the
    worker's own failure share, which can be anything from 0 to 1: the bound
    is then the lesser of the service and a failure's cost."""
    f = np.array(fail, dtype=np.float64)[:, None]
    bound = (1.0 - err) * price + err * f
    return bound if priced else np.minimum(bound, f)
