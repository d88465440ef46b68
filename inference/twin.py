"""The fleet as this instance's own trace records show it, simulated: a refit
is judged by the routing it would give here, not by its prediction loss alone
(inference/retrain.py).

`describe(records, sample)` reads from joined trace records (inference/traces.py)
what a simulated copy of the fleet needs:

* the arrivals: the records over their time span, divided by the share of
  requests sampled (`learning.trace_sample`), and the mix of classes;
* per backend, its share of failures, and per class the median and spread
  (standard deviation of the log) of the answers' latency among those sent
  while the backend had the fewest requests in flight (its lowest quartile of
  the in-flight feature, which is the instance's count at the table that
  routed the request): the service time, as far as the records tell it;
* its slots: the in-flight count (+1) below which answers did not wait, the
  90th percentile of the counts the answers within 1.25x the service time
  were sent at (at least 1).

`judge(live, challenger, fleet)` routes the same arrivals (each backend
drawing its service times from a stream of its own) through the real `ml`
pick twice: a worker's
`TableStrategy` (its load curves, no control share: the table is judged, not
the guard) fed every 100 simulated ms by an `inference.engine.Engine` with
each model, as lb routes.  A backend serves `slots` requests at once (FIFO
beyond), each in a lognormal time around its class's median; a failure
answers at once.  The challenger passes when its p99 is within MARGIN of the
live model's and it fails no more than ERR_MARGIN more.  The copy is coarse
(no slowdowns, joins or retries; one worker), and the same copy judges both
models: it tells a model that would route worse here, not how good either is.
At most MAX_REQUESTS requests per model (a second or two of CPU at the
refit's low priority).  The simulator of bench/sim.py is the full version
of this loop, for the benchmarks; this one ships with lb, which has no
`bench/`.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from inference.features import FEATURES

MARGIN = 0.1  # the challenger's p99 may exceed the live model's by this share
ERR_MARGIN = 0.001  # ... and its error rate by this (absolute)
MAX_REQUESTS = 15_000  # per model and judgement
MAX_SECONDS = 30.0  # simulated, at most
MIN_RECORDS = 100  # records before a fleet is described (a refit holds out at least that many)
TICK = 0.1  # seconds between two tables (lb's default learning.interval)
HOP = 0.0001  # seconds, one way between two processes

_INFLIGHT = FEATURES.index("inflight_log")


class TwinError(Exception):
    pass


@dataclass
class TwinBackend:
    name: str
    slots: int
    service: list[float]  # seconds, median per class (0: the class's median over the fleet)
    sigma: list[float]  # log-spread per class
    fail: float  # share of requests answered with a failure at once


@dataclass
class Fleet:
    classes: list[str]
    mix: list[float]  # share of arrivals per class
    rate: float  # requests per second
    backends: list[TwinBackend] = field(default_factory=list)


def describe(records: dict[str, np.ndarray], sample: float) -> Fleet:
    """The fleet as `records` (joined trace records, time-ordered or not) show it;
    `sample`: the share of requests they were sampled from."""
    n = len(records["latency"])
    if n < MIN_RECORDS:
        raise TwinError(f"{n} records, need {MIN_RECORDS}")
    if not 0 < sample <= 1:
        raise TwinError(f"sample share {sample} outside (0, 1]")
    ts = records["ts"].astype(np.float64)
    span = float(ts.max() - ts.min())
    if span <= 0:
        raise TwinError("the records span no time")
    lat = np.maximum(records["latency"].astype(np.float64), 1e-5)
    ok = records["ok"].astype(bool)
    load = np.maximum(np.expm1(records["features"][:, _INFLIGHT].astype(np.float64)), 0.0)
    names = records["backend"].astype(str)
    cls = records["cls"].astype(str)
    classes = sorted(set(cls.tolist()), key=lambda c: (c != "default", c))
    mix = [float(np.mean(cls == c)) for c in classes]
    # (the span misses about one report interval at each end: close enough)
    rate = n / sample / span
    backends = []
    for name in sorted(set(names.tolist())):
        mine = names == name
        fail = float(np.mean(~ok[mine]))
        good = mine & ok
        low = good & (load <= np.quantile(load[good], 0.25)) if good.any() else good
        service, sigma = [], []
        for c in classes:
            sel = low & (cls == c)
            if sel.sum() < 3:
                sel = good & (cls == c)
            if sel.sum() < 3:
                service.append(0.0)
                sigma.append(0.3)
                continue
            logs = np.log(lat[sel])
            service.append(float(np.exp(np.median(logs))))
            sigma.append(float(np.clip(np.std(logs), 0.05, 1.5)))
        # slots: the counts at which answers came back within 1.25x the service time
        k = 1
        fast = []
        for ci, c in enumerate(classes):
            if service[ci] > 0:
                sel = good & (cls == c) & (lat <= 1.25 * service[ci])
                fast.append(load[sel])
        if fast and sum(len(f) for f in fast):
            k = max(1, int(round(np.quantile(np.concatenate(fast), 0.9))) + 1)
        backends.append(TwinBackend(name, k, service, sigma, fail))
    # a class a backend never answered: the fleet's median for it, scaled by
    # the backend's speed on the classes it did answer
    for ci in range(len(classes)):
        known = [b.service[ci] for b in backends if b.service[ci] > 0]
        typical = float(np.median(known)) if known else 0.01
        for b in backends:
            if b.service[ci] <= 0:
                b.service[ci] = typical
    return Fleet(classes, mix, rate, backends)


@dataclass
class Outcome:
    p99: float
    error_rate: float
    requests: int


@dataclass
class Verdict:
    passed: bool
    live: Outcome
    challenger: Outcome

    def fields(self) -> dict:
        return {"twin_live_p99_ms": round(self.live.p99 * 1e3, 2),
                "twin_challenger_p99_ms": round(self.challenger.p99 * 1e3, 2),
                "twin_live_errors": round(self.live.error_rate, 5),
                "twin_challenger_errors": round(self.challenger.error_rate, 5),
                "twin_requests": self.live.requests}


def judge(live, challenger, fleet: Fleet, *, seed: int = 0, learning: dict | None = None) -> Verdict:
    """Route the same simulated traffic with each model; does the challenger
    pass?  `learning`: settings of lb's [learning] section that shape the
    pick (`model_errors`), as the instance has them."""
    a = route(fleet, live, seed=seed, learning=learning)
    b = route(fleet, challenger, seed=seed, learning=learning)
    passed = b.p99 <= a.p99 * (1.0 + MARGIN) and b.error_rate <= a.error_rate + ERR_MARGIN
    return Verdict(passed, a, b)


def _config(fleet: Fleet, learning: dict | None = None):
    from lb.core.config import from_dict

    return from_dict({
        "strategy": "ml",
        "backends": [{"address": f"127.0.0.1:{20000 + i}", "name": b.name} for i, b in enumerate(fleet.backends)],
        "classes": [{"name": c, "path_prefix": f"/{c}"} for c in fleet.classes if c != "default"],
        "learning": {**(learning or {}), "trace_sample": 0.0},
    }, "<twin>")


def route(fleet: Fleet, model, *, seed: int = 0, learning: dict | None = None) -> Outcome:
    """One run of the copy with `model` routing; common random numbers: the
    same `seed` draws the same arrivals and the same service times."""
    from inference.engine import Engine
    from workers.backend import Backend
    from workers.strategies import make_strategy
    from workers.telemetry import build_stats

    cfg = _config(fleet, learning)
    classes = list(cfg.class_names)
    local = [classes.index(c) for c in fleet.classes]  # fleet class -> lb class index
    backends = []
    for i, bc in enumerate(cfg.backends):
        b = Backend(bc, len(classes), i)
        b.sent = None  # (the admin's curves: no admin here)
        backends.append(b)
    now = [0.0]
    strategy = make_strategy("ml", backends, decay=10.0, seed=seed + 1, class_names=classes,
                             exploration=cfg.learning.exploration)
    strategy.clock = lambda: now[0]
    engine = Engine(cfg, model, now=0.0)
    engine.set_control(None)

    rng = random.Random(seed)
    seconds = min(MAX_SECONDS, MAX_REQUESTS / max(fleet.rate, 1e-9))
    specs = fleet.backends
    busy = [0] * len(specs)
    queues: list[deque] = [deque() for _ in specs]
    # per backend, its own stream of service draws: the same for both models
    draws = [random.Random(seed * 7919 + i) for i in range(len(specs))]
    heap: list = []
    seq = 0
    lat: list[float] = []
    errors = 0
    requests = 0
    cum = np.cumsum(fleet.mix).tolist()

    def push(t, kind, obj):
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, kind, obj))

    def start(i, req, t):
        busy[i] += 1
        c = req[1]
        s = specs[i]
        push(t + s.service[c] * math.exp(draws[i].gauss(0.0, s.sigma[c])), 1, req)

    t = rng.expovariate(fleet.rate)
    push(t, 0, None)
    push(TICK, 2, None)
    stats_seq = 0
    table_seq = 0
    while heap:
        t, _, kind, req = heapq.heappop(heap)
        now[0] = t
        if kind == 0:  # an arrival
            if t >= seconds:
                continue
            push(t + rng.expovariate(fleet.rate), 0, None)
            fc = min(bisect.bisect_left(cum, rng.random()), len(cum) - 1)
            c = local[fc]
            b = strategy.pick((), c)
            requests += 1
            if b is None:
                errors += 1
                continue
            i = b.idx
            load = b.inflight
            work, mix = b.curve.start(c, load, t)
            b.inflight += 1
            r = [t, fc, c, b, load, work, mix]
            if draws[i].random() < specs[i].fail:
                push(t + 2 * HOP, 3, r)
            elif busy[i] < specs[i].slots:
                start(i, r, t + HOP)
            else:
                queues[i].append(r)
        elif kind == 2:  # stats in, a table out
            if t + TICK < seconds:
                push(t + TICK, 2, None)
            stats_seq += 1
            engine.ingest(build_stats(backends, classes, slot=0, pid=1, generation=1, seq=stats_seq, ts=t,
                                      counters={"connections": 0, "accepted": requests, "requests": requests,
                                                "rejected": 0, "timeouts": 0, "no_backend": 0},
                                      strategy=strategy), t)
            table_seq += 1
            strategy.set_table(engine.tick(t, 1, table_seq))
            strategy.check(t)
        else:  # an answer (1) or a failure (3) leaves the backend
            t0, fc, c, b, load, work, mix = req
            i = b.idx
            if kind == 1:
                busy[i] -= 1
                if queues[i]:
                    start(i, queues[i].popleft(), t)
            rtt = t + HOP - t0
            b.inflight -= 1
            b.curve.done(c, work, b.inflight)
            b.responses[2 if kind == 1 else 5] += 1
            b.record(c, rtt, kind == 3, t + HOP, load, mix)
            if kind == 3:
                errors += 1
            lat.append(rtt + HOP)
    if not requests:
        raise TwinError("no requests simulated")
    lat.sort()
    p99 = lat[min(len(lat) - 1, max(0, math.ceil(0.99 * len(lat)) - 1))] if lat else 0.0
    return Outcome(p99, errors / requests, requests)
