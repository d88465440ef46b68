"""Discrete-event simulator of lb in front of the quality scenarios' backends.

It runs THE SAME policy code as lb's workers: each simulated worker holds its
own `workers.backend.Backend` objects (its own in-flight counts, peak-EWMA
and counters) and its own strategy from `workers.strategies.make_strategy`;
every request is routed by `strategy.pick`, every answer goes through
`strategy.observe` and the per-class `Backend.record`.  Only time is fake:
backends are modelled as in `bench/scenarios.py` (capacity, FIFO queue,
lognormal service time, phases), arrivals are the same open-loop schedule
the real benchmark sends, and latency = queueing + service + a fixed hop.

As in a worker: a refused connection is retried once on another backend
(`upstream.retries = 1`), a 5xx answer is relayed (never retried).  The
client gives up after `--timeout` seconds: that request counts as an error at
the timeout, and the worker's strategy hears of it (`abandoned`, as lb's
worker does when a client closes its connection while it waits; ml learns
the clients' patience from it, workers/patience.py).  Unlike lb's worker,
which stops counting such a request against the backend, the simulated
worker counts it until the backend answers (the backend works on it all
the same).  Requests are spread over the workers at random, like
connections over SO_REUSEPORT listeners.

The `ml` policy is driven by the real inference code when it is importable
(see `bench/sim_ml.py`): every 0.1 simulated seconds each worker's
`WorkerStats` goes to `inference.engine.Engine`, and the table it computes
is handed to every worker's strategy.  Without it `ml` runs as lb does with
no inference process: on the workers' own load curves.

Two ablations run beside the shipped policies, to say what the network adds:
`ml-identity` is the whole `ml` pipeline (engine, weights, costs, the
worker's pick and guard) with the model replaced by the identity (predicted
latency = the cell's observed mean, `lat_ewma_log`; predicted error = its
observed error rate, `err_rate`); `ml-curves` is the `ml` strategy with no
inference process at all (each worker's load curves alone, as lb routes when
no table may); `least-latency` is a full scan for the least peak-EWMA x
(in-flight + 1), no sampling.  And a reference: `known` routes by the
truth about the fleet (every backend's slots, per-class service time,
slowdown and queue at the moment, `sim_model.Known`), to show what knowing
the fleet is worth.  None is an lb strategy.

A scenario with `instances` > 1 (twolb), or `--instances N`, puts N lb
instances in front of the same backends: each has its own workers and its own
inference engine and tables, and takes its share of the arrivals at random.

Scenarios with a slowdown also get the time to divert per policy (column
`divert`, `scenario_report.time_to_divert`): from the slowdown's start
until the backend's share of the requests sent from then on falls below
half of what it was in the second before (the change point of its share).

The model (backends, requests, workers) is in `bench/sim_model.py`, the
overview over scenarios in `bench/sim_report.py`, the command line in
`bench/sim_args.py`; the event loop is here.

    python bench/sim.py [--scenario NAME[,NAME]|all|fleet<seed>] [--policies a,b]
                        [--duration 60] [--rate R] [--workers 1] [--instances N]
                        [--seed 1] [--json FILE] [--model PATH] [--traces DIR]
                        [--exploration E] [--capacity-explore SHARE]

Exit codes: 0 ok, 2 bad usage.
"""

from __future__ import annotations

import heapq
import inspect
import json
import os
import random
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
for _p in (BENCH_DIR, REPO_ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import scenario_report as report  # noqa: E402  (bench/scenario_report.py)
import scenarios as scn  # noqa: E402  (bench/scenarios.py)
import sim_model  # noqa: E402  (bench/sim_model.py)
from sim_model import (  # noqa: E402  (bench/sim_model.py)
    FAIL_FAST, HOP, ML_POLICIES, POLICIES, RETRIES, STATS_INTERVAL, Known, Request, Server, Worker)
from sim_args import parse_args  # noqa: E402  (bench/sim_args.py)
from sim_report import overview  # noqa: E402  (bench/sim_report.py)
from workers import backend as wbackend  # noqa: E402

# Which form of Backend.record the balancer has (for pick and Backend: bench/sim_model.py)
_HAS_RECORD = hasattr(wbackend.Backend, "record")
# Backend.record(cls, latency, error, now) also updates the peak EWMA (one call per response).
_RECORD_OBSERVES = _HAS_RECORD and "now" in inspect.signature(wbackend.Backend.record).parameters
# ... and takes the in-flight count the request was sent at (ml's load curves)
_RECORD_LOADS = _HAS_RECORD and "load" in inspect.signature(wbackend.Backend.record).parameters
# ... and how heavy the requests in flight were, against it (Curve.start returns both)
_RECORD_MIX = _HAS_RECORD and "mix" in inspect.signature(wbackend.Backend.record).parameters

_DONE, _FAILED, _TICK, _GAVE_UP = 0, 1, 2, 3  # event kinds


class Simulation:
    def __init__(self, sc: scn.Scenario, policy: str, *, duration: float = 60.0,
                 rate: float | None = None, workers: int = 1, seed: int = 1,
                 timeout: float = 2.0, model: str | None = None,
                 traces: str | None = None, exploration: float | None = None,
                 instances: int | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.sc = sc
        self.policy = policy
        self.duration = duration
        self.timeout = timeout
        self.arrivals = scn.run_schedule(sc, duration, rate, seed)
        self.servers = [Server(spec, seed * 104729 + i) for i, spec in enumerate(sc.backends)]
        self.instances = sc.instances if instances is None else instances
        if self.instances < 1:
            raise ValueError("instances must be >= 1")
        # instance k holds workers k * workers .. (k + 1) * workers - 1; slots are
        # numbered per instance, as each lb numbers its own
        self.workers = [Worker(i % workers, sc, policy, seed + 7 * (i // workers), i // workers)
                        for i in range(workers * self.instances)]
        for w in self.workers:
            if isinstance(w.strategy, Known):  # the reference reads the true fleet
                w.strategy.servers = self.servers
                w.strategy.frac = lambda: self.now / self.duration
            if hasattr(w.strategy, "clock"):
                w.strategy.clock = self.clock  # answers are timed in simulated seconds
        # ml learns how long clients wait from the requests they give up on (workers/patience.py)
        self.notify = hasattr(self.workers[0].strategy, "patience")
        self.spread = random.Random(seed * 31 + 7)
        self.records: list[tuple[float, float, int, str]] = []
        self.heap: list = []
        self.seq = 0
        self.now = 0.0
        self.note = ""
        self.seed = seed
        self.exploration = exploration  # ml: learning.exploration (None: lb's default)
        self.bridge = None
        self.bridges: list = []  # one per lb instance
        if policy in ML_POLICIES or traces:
            # ml routes by the engine's tables; any other policy with --traces
            # only feeds the engine (features and trace joins), as lb does when
            # `learning.traces` is set under another strategy
            import sim_ml  # bench/sim_ml.py

            for k in range(self.instances):
                mine = [w for w in self.workers if w.instance == k]
                bridge, self.note = sim_ml.attach(self, model, traces, workers=mine,
                                                  identity=policy == "ml-identity", instance=k)
                if bridge is None:
                    self.bridges = []
                    break
                self.bridges.append(bridge)
            self.bridge = self.bridges[0] if self.bridges else None

    def clock(self) -> float:
        return self.now

    # -- events ---------------------------------------------------------------

    def _push(self, t: float, kind: int, obj) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, obj))

    def run(self) -> list[tuple[float, float, int, str]]:
        heap = self.heap
        arrivals = self.arrivals
        n_workers = len(self.workers)
        rnd = self.spread.random
        if self.bridge is not None or self.policy == "ml-curves":
            self._push(STATS_INTERVAL, _TICK, None)
        i = 0
        inf = float("inf")
        while True:
            t_arr = arrivals[i][0] if i < len(arrivals) else inf
            if heap and heap[0][0] <= t_arr:
                t, _, kind, obj = heapq.heappop(heap)
                self.now = t
                if kind == _TICK:
                    for bridge in self.bridges:
                        bridge.tick(t)
                    if not self.bridges:
                        # no inference process: a worker still checks its mode (and
                        # refits its load curves) every stats tick
                        for w in self.workers:
                            w.strategy.check(t)
                    if t + STATS_INTERVAL < self.duration:
                        self._push(t + STATS_INTERVAL, _TICK, None)
                elif kind == _GAVE_UP:
                    if not obj.answered and obj.backend is not None:
                        self.workers[obj.worker].strategy.abandoned(t - obj.t0, obj.cls)
                else:
                    self._answer(obj, t, kind)
            elif t_arr < inf:
                sched, cls = arrivals[i]
                i += 1
                self.now = sched
                w = int(rnd() * n_workers) if n_workers > 1 else 0
                self.workers[w].requests += 1
                req = Request(sched, cls, w)
                self._dispatch(req, sched, None)
                if self.notify and not req.answered:
                    self._push(sched + self.timeout, _GAVE_UP, req)
            else:
                break
        if self.bridge is not None:
            if self.policy in ML_POLICIES:
                self.note = self.bridge.note()
            for bridge in self.bridges:
                bridge.write_traces()
        return self.records

    def _dispatch(self, req: Request, now: float, backend) -> None:
        w = self.workers[req.worker]
        if backend is None:
            backend = w.pick(req.tried or (), req.cls)
            if w.guard is not None and req.tried is None:
                req.arm = w.strategy.arm
        if backend is None:
            w.no_backend += 1
            self._record(req, now + HOP, 503, "-")
            return
        backend.requests += 1
        req.load = backend.inflight
        cv = getattr(backend, "curve", None)
        if cv is not None:
            if _RECORD_MIX:
                req.work, req.mix = cv.start(req.cls, req.load, now)
            else:
                req.work = cv.start(req.cls, req.load, now)
        backend.inflight += 1
        req.backend = backend
        req.t0 = now
        srv = self.servers[w.index[id(backend)]]
        frac = now / self.duration
        spec = srv.spec
        if frac < spec.join_at:
            # Connection refused: as upstream_failed(sent_nothing=True) does.
            backend.inflight -= 1
            if cv is not None:
                cv.done(req.cls, req.work, backend.inflight)
            backend.connect_errors += 1
            tried = req.tried
            if tried is None:
                tried = req.tried = []
            tried.append(backend)
            if len(tried) <= RETRIES:
                nxt = w.pick(tried, req.cls)
                if nxt is not None:
                    backend.retries += 1
                    self._dispatch(req, now + 2 * HOP, nxt)
                    return
            backend.responses[5] += 1
            if _HAS_RECORD:
                backend.record(req.cls, 2 * HOP, True)
            if req.arm >= 0:
                w.guard.outcome(req.arm, 2 * HOP, True)
            self._record(req, now + 3 * HOP, 502, "-")
            return
        slow, fail = spec.factors(frac)
        if fail and srv.rng.random() < fail:
            self._push(now + HOP + FAIL_FAST, _FAILED, req)
            return
        if srv.busy < spec.capacity:
            self._start(srv, req, now + HOP, slow)
        else:
            srv.queue.append(req)

    def _start(self, srv: Server, req: Request, now: float, slow: float) -> None:
        srv.busy += 1
        self._push(now + scn.service_time(srv.spec, req.cls, slow, srv.rng), _DONE, req)

    def _answer(self, req: Request, t: float, kind: int) -> None:
        """A response head leaves the backend at `t`."""
        w = self.workers[req.worker]
        b = req.backend
        idx = w.index[id(b)]
        if kind == _DONE:
            srv = self.servers[idx]
            srv.busy -= 1
            srv.served += 1
            if srv.queue:
                slow, _ = srv.spec.factors(t / self.duration)
                self._start(srv, srv.queue.popleft(), t, slow)
            status = 200
        else:
            status = scn.FAIL_STATUS
        at_proxy = t + HOP
        rtt = at_proxy - req.t0
        b.inflight -= 1
        cv = getattr(b, "curve", None)
        if cv is not None:
            cv.done(req.cls, req.work, b.inflight)
        b.responses[status // 100] += 1
        if _RECORD_MIX:
            b.record(req.cls, rtt, status >= 500, at_proxy, req.load, req.mix)
        elif _RECORD_LOADS:
            b.record(req.cls, rtt, status >= 500, at_proxy, req.load)
        elif _RECORD_OBSERVES:
            b.record(req.cls, rtt, status >= 500, at_proxy)
        else:
            w.strategy.observe(b, rtt, at_proxy)
            if _HAS_RECORD:
                b.record(req.cls, rtt, status >= 500)
        if req.arm >= 0:
            w.guard.outcome(req.arm, rtt, status >= 500)
        self._record(req, at_proxy + HOP, status, b.name)

    def _record(self, req: Request, t: float, status: int, backend: str) -> None:
        req.answered = True
        latency = t - req.sched
        if latency > self.timeout:
            self.workers[req.worker].timeouts += 1
            self.records.append((req.sched, self.timeout, 0, backend))
        else:
            self.records.append((req.sched, latency, status, backend))

    def summary(self) -> report.Summary:
        s = report.summarize(self.policy, self.records, [b.name for b in self.sc.backends], self.note)
        s.divert = scn.divert_times(self.sc, self.records, self.duration)
        return s


def simulate(sc: scn.Scenario, policy: str, **kw) -> report.Summary:
    sim = Simulation(sc, policy, **kw)
    sim.run()
    return sim.summary()


def main(argv=None) -> int:
    args = parse_args(argv, __doc__.split("\n\n")[0])
    if args.capacity_explore is not None:
        sim_model.PROBE_SHARE = args.capacity_explore
    out: dict = {"duration": args.duration, "workers": args.workers, "seed": args.seed,
                 "scenarios": {}}
    for sc in args.scenarios:
        name = sc.name
        rate = args.rate or sc.rate
        instances = sc.instances if args.instances is None else args.instances
        lbs = f" x {instances} lb instances" if instances > 1 else ""
        print(f"\n== {name}: {sc.description}; {rate:g} req/s, {args.duration:g} s simulated, "
              f"{args.workers} worker(s){lbs}, seed {args.seed}")
        for spec in sc.backends[:report.MAX_SHARE_COLUMNS]:
            print(f"   {spec.describe()}")
        if len(sc.backends) > report.MAX_SHARE_COLUMNS:
            print(f"   ... {len(sc.backends) - report.MAX_SHARE_COLUMNS} more, to {sc.backends[-1].describe()}")
        rows = []
        for policy in args.policies:
            t0 = time.perf_counter()
            rows.append(simulate(sc, policy, duration=args.duration, rate=args.rate,
                                 workers=args.workers, seed=args.seed, timeout=args.timeout,
                                 model=args.model, traces=args.traces,
                                 exploration=args.exploration, instances=args.instances))
            rows[-1].wall = time.perf_counter() - t0  # type: ignore[attr-defined]
        print(report.table(sc, rows))
        schedule = scn.run_schedule(sc, args.duration, args.rate, args.seed)
        print(scn.floor_line(scn.floor(sc, schedule, args.duration, args.seed)))
        print(f"({sum(r.requests for r in rows)} requests simulated in "
              f"{sum(r.wall for r in rows):.1f} s)")  # type: ignore[attr-defined]
        out["scenarios"][name] = {"rate": rate, "instances": instances,
                                  "rows": [r.as_dict() for r in rows]}
        sys.stdout.flush()
    if len(out["scenarios"]) > 1:
        print("\n" + overview(out["scenarios"], args.policies))
        if args.markdown:
            print("\n" + overview(out["scenarios"], args.policies, markdown=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
