"""What bench/sim.py simulates: backends, requests in flight and lb's workers.

`Server` is one backend as `bench/scenarios.py` describes it (`capacity`
requests in service, the rest in a FIFO queue); `Request` is one request on
its way; `Worker` is what one lb worker holds: its own
`workers.backend.Backend` objects and its own strategy from
`workers.strategies.make_strategy`, the real ones.  `LeastLatency` is an
ablation and `Known` a reference, neither an lb strategy.  Also the policy
names the simulator runs and the model's constants (the hop between two
processes, lb's defaults).  The event loop that drives them is `Simulation`
in bench/sim.py, which puts the repository on sys.path before importing
this module.
"""

from __future__ import annotations

import inspect
import random
from collections import deque

import scenarios as scn  # bench/scenarios.py
from lb.core.config import Backend as BackendConfig, Capacity, Learning
from workers import backend as wbackend, classic, strategies

# ml's capacity exploration (`capacity.explore`) in the simulation; None: lb's default
PROBE_SHARE: float | None = None

POLICIES = ("round_robin", "weighted_round_robin", "least_connections", "random", "p2c_ewma", "prequal", "ml",
            "ml-identity", "ml-curves", "least-latency", "known")
ML_POLICIES = ("ml", "ml-identity")  # routed by the engine's tables (TableStrategy)
CURVE_POLICIES = ML_POLICIES + ("ml-curves",)  # lb's ml strategy, with or without tables
ABLATIONS = ("ml-identity", "ml-curves", "least-latency", "known")  # not lb strategies

HOP = 0.0001  # seconds, one way between two processes on the same host
FAIL_FAST = 0.0  # service time of a fast failure (lb measures ~0.16 ms for one, hops included)
RETRIES = 1  # lb's default upstream.retries
EWMA_DECAY = 10.0  # lb's default balancer.ewma_decay
STATS_INTERVAL = 0.1  # lb's default learning.stats_interval

# The balancer's API gained a request class (pick(exclude, cls), Backend(cfg,
# n_classes, idx)); accept both so the simulator runs whichever is checked out.
_PICK_TAKES_CLASS = "cls" in inspect.signature(classic.Strategy.pick).parameters
_BACKEND_TAKES_CLASSES = "n_classes" in inspect.signature(wbackend.Backend.__init__).parameters


class LeastLatency(classic.P2CEwma):
    """Ablation, not an lb strategy: every pick scans all backends for the least
    peak-EWMA x (in-flight + 1), no sampling (ties: the first after a rotating
    start, so equal backends share)."""

    name = "least-latency"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._next = 0

    def pick(self, exclude=(), cls=0):
        backends = self.backends
        n = len(backends)
        start = self._next
        self._next = start + 1 if start + 1 < n else 0
        best = None
        best_cost = 0.0
        for k in range(n):
            b = backends[(start + k) % n]
            if not b.available or (exclude and b in exclude):
                continue
            c = b.ewma * (b.inflight + 1)
            if best is None or c < best_cost:
                best, best_cost = b, c
        return best


class Known(classic.Strategy):
    """A reference, not an lb strategy: a router told the truth about the
    fleet, to show what knowing it is worth.  Every pick reads each backend's
    true state at that moment (`Server`: requests in service and queued, from
    every worker and lb instance), its slot count, its median service time
    for the request's class, and its slowdown, failure share and joining
    time from the scenario, and sends the request where its expected
    latency is least: its mean service there, plus, with every slot taken,
    (queued + 1) / slots of the mean service of the fleet's request mix
    there; a failure share f prices the request at (1 - f) x that + f x
    FAIL_COST.  It does not know how long the requests in service or the
    request itself will take (that would be the floor, bench/scenarios.py
    `floor`).  It is no bound (a greedy rule is not the best for a
    percentile in an overload: ml's p99 is lower in spread16), but where it
    is well ahead of a policy that learns the fleet, there is something
    left to learn."""

    name = "known"
    FAIL_COST = 1.0  # seconds, as ml prices a failure (workers/learned.py)

    def __init__(self, backends, sc: scn.Scenario, **kw) -> None:
        super().__init__(backends, **kw)
        self.sc = sc
        self.servers: list[Server] = []  # the simulation's, in the backends' order (bench/sim.py)
        self.frac = lambda: 0.0  # the moment, as a fraction of the run (bench/sim.py)

    def pick(self, exclude=(), cls=0):
        frac = self.frac()
        h = self.sc.heavy_share
        best = None
        best_cost = 0.0
        for b, srv in zip(self.backends, self.servers):
            spec = srv.spec
            if frac < spec.join_at or (exclude and b in exclude):
                continue
            slow, fail = spec.factors(frac)
            if fail >= 1.0:
                continue
            cost = spec.mean_service(spec.cost(cls), slow)
            if srv.busy >= spec.capacity:
                cost += (len(srv.queue) + 1) / spec.capacity * spec.mean_service(spec.mix_cost(h), slow)
            cost = (1.0 - fail) * cost + fail * self.FAIL_COST
            if best is None or cost < best_cost:
                best, best_cost = b, cost
        return best


class Server:
    """One simulated backend: `capacity` requests in service, the rest queue."""

    __slots__ = ("spec", "rng", "busy", "queue", "served")

    def __init__(self, spec: scn.BackendSpec, seed: int) -> None:
        self.spec = spec
        self.rng = random.Random(seed)
        self.busy = 0
        self.queue: deque[Request] = deque()
        self.served = 0


class Request:
    __slots__ = ("sched", "cls", "worker", "tried", "backend", "t0", "arm", "load", "work", "mix", "answered")

    def __init__(self, sched: float, cls: int, worker: int) -> None:
        self.sched = sched
        self.cls = cls
        self.worker = worker
        self.tried: list | None = None
        self.backend = None
        self.t0 = 0.0
        self.arm = -1  # ml's guard: which arm picked the backend (-1: not judged)
        self.load = -1  # the worker's in-flight requests to the backend when it was sent
        self.work = 0.0  # ml: the expected service it added to the backend's load curve
        self.mix = 1.0  # ... and how heavy the requests in flight there were, against it
        self.answered = False  # its answer (or lb's error) has left for the client


class Worker:
    """What one lb worker holds: its Backend objects, its strategy, its counters."""

    def __init__(self, slot: int, sc: scn.Scenario, policy: str, seed: int, instance: int = 0) -> None:
        self.slot = slot
        self.instance = instance  # which lb instance the worker belongs to
        self.backends = []
        for i, spec in enumerate(sc.backends):
            cfg = BackendConfig(address=f"127.0.0.1:{20000 + i}", weight=spec.weight, name=spec.name)
            if _BACKEND_TAKES_CLASSES:
                b = wbackend.Backend(cfg, len(scn.CLASSES), i)
            else:
                b = wbackend.Backend(cfg)
            if hasattr(b, "sent"):
                b.sent = None  # (the answers a worker keeps for the admin's curves: no admin here)
            self.backends.append(b)
        self.index = {id(b): i for i, b in enumerate(self.backends)}
        kw = {"decay": EWMA_DECAY, "seed": seed * 1000 + slot + 1}
        if "class_names" in inspect.signature(strategies.make_strategy).parameters:
            kw["class_names"] = scn.CLASSES
        if "guard_share" in inspect.signature(strategies.make_strategy).parameters:
            kw["guard_share"] = Learning().guard_share  # lb's default
        if "exploration" in inspect.signature(strategies.make_strategy).parameters:
            kw["exploration"] = Learning().exploration  # lb's default (a table may say otherwise)
        if "probe_share" in inspect.signature(strategies.make_strategy).parameters:
            kw["probe_share"] = PROBE_SHARE if PROBE_SHARE is not None else Capacity().explore
        if policy == Known.name:
            self.strategy = Known(self.backends, sc, decay=EWMA_DECAY, rng=random.Random(kw["seed"]))
        elif policy == LeastLatency.name:
            self.strategy = LeastLatency(self.backends, decay=EWMA_DECAY, rng=random.Random(kw["seed"]))
        else:
            self.strategy = strategies.make_strategy("ml" if policy in CURVE_POLICIES else policy,
                                                     self.backends, **kw)
        self.guard = getattr(self.strategy, "guard", None)
        self.requests = 0
        self.no_backend = 0
        self.timeouts = 0
        self.seq = 0

    def pick(self, exclude, cls: int):
        if _PICK_TAKES_CLASS:
            return self.strategy.pick(exclude, cls)
        return self.strategy.pick(exclude)
