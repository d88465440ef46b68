"""A synthetic worker: `WorkerStats` from a tiny queueing model, for tests and benchmarks.

Each backend has `capacity` slots served first-come first-served with a
lognormal service time (x `heavy` for the "heavy" class) and answers a
`fail_rate` share at once with a 5xx.  Requests arrive at `rate` per second
(open loop, Poisson) and are routed by the latest table's weights, or at
random.  `SyntheticWorker.report(now)` returns a `WorkerStats` with
cumulative counters exactly as a real worker sends them, including sampled
`TraceSample`s stamped with the table they were routed with.

It is not the benchmark simulator (`bench/sim.py`): it exists to exercise
the inference process and the training path without real backends.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from dataclasses import dataclass

from lb.core.messages import N_BUCKETS, BackendStats, Table, TraceSample, WorkerStats, bucket_index


@dataclass
class SynthBackend:
    name: str
    capacity: int = 8
    service: float = 0.005  # seconds, median
    fail_rate: float = 0.0
    heavy: float = 3.0  # service time factor of the "heavy" class


class SyntheticWorker:
    def __init__(self, backends: list[SynthBackend], classes: list[str], *, rate: float = 300.0,
                 pid: int = 4242, seed: int = 0, sample: float = 0.2, heavy_share: float = 0.25,
                 start: float = 0.0) -> None:
        self.specs = backends
        self.classes = classes
        self.rate = rate
        self.pid = pid
        self.rng = random.Random(seed)
        self.sample = sample
        self.heavy_share = heavy_share
        self.slow_factor = [1.0] * len(backends)  # change to slow a backend down
        nb, nc = len(backends), len(classes)
        self.free = [[0.0] * b.capacity for b in backends]  # heap of slot free times
        self.finishes: list[list[float]] = [[] for _ in backends]  # sorted finish times (in-flight)
        self.pending: list[tuple[float, int, int, float, bool, int, int]] = []  # heap by finish time
        self.requests = [0] * nb
        self.responses = [[0] * 6 for _ in backends]
        self.cresp = [[0] * nc for _ in backends]
        self.cerr = [[0] * nc for _ in backends]
        self.clsum = [[0.0] * nc for _ in backends]
        self.chist = [[[0] * N_BUCKETS for _ in range(nc)] for _ in backends]
        self.traces: list[TraceSample] = []
        self.t = start  # simulated clock (time.time() when driven in real time)
        self.seq = 0
        self.table: Table | None = None
        self.routed = [0] * nb

    def _pick(self, cls: int) -> int:
        t = self.table
        if t is not None and t.mode == "learned" and t.weights:
            # a simple stand-in for the workers' pick (which is workers.learned.
            # TableStrategy's least expected cost by load curve): a uniform draw with
            # probability `exploration`, else two draws by the table's weights and
            # the lower cost x (in-flight + 1).  It only has to give the engine
            # traffic shaped by its tables; routing quality is measured elsewhere.
            row = t.weights[cls]
            live = [i for i, w in enumerate(row) if w > 0]
            if t.cost and self.rng.random() < t.exploration:
                return self.rng.choice(live)
            a, b = self.rng.choices(range(len(row)), weights=row, k=2)
            fa, fb = len(self.finishes[a]), len(self.finishes[b])
            if t.cost:
                cost = t.cost[cls]
                return a if cost[a] * (fa + 1) <= cost[b] * (fb + 1) else b
            return a if row[a] / (fa + 1) >= row[b] / (fb + 1) else b
        return self.rng.randrange(len(self.specs))

    def run_until(self, now: float) -> None:
        """Generate and serve the requests that arrive before `now`."""
        while True:
            self.t += self.rng.expovariate(self.rate)
            if self.t >= now:
                self.t = now
                break
            self._one(self.t)
        self._complete(now)

    def _one(self, t: float) -> None:
        self._complete(t)
        heavy = len(self.classes) > 1 and self.rng.random() < self.heavy_share
        cls = 1 if heavy else 0
        b = self._pick(cls)
        spec = self.specs[b]
        self.requests[b] += 1
        self.routed[b] += 1
        if self.rng.random() < spec.fail_rate:
            finish, ok, status = t + 0.0003 * self.rng.uniform(0.5, 1.5), False, 5
        else:
            service = spec.service * self.slow_factor[b] * math.exp(self.rng.gauss(0, 0.3))
            if heavy:
                service *= spec.heavy
            slots = self.free[b]
            start = max(t, heapq.heappop(slots))
            finish = start + service
            heapq.heappush(slots, finish)
            ok, status = True, 2
        bisect.insort(self.finishes[b], finish)
        tseq = (self.table.epoch, self.table.seq) if self.table is not None else (0, 0)
        heapq.heappush(self.pending, (finish, b, cls, finish - t, ok, status, tseq))

    def _complete(self, now: float) -> None:
        while self.pending and self.pending[0][0] <= now:
            finish, b, cls, latency, ok, status, tseq = heapq.heappop(self.pending)
            fl = self.finishes[b]
            del fl[bisect.bisect_left(fl, finish)]
            self.responses[b][status] += 1
            self.cresp[b][cls] += 1
            if not ok:
                self.cerr[b][cls] += 1
            self.clsum[b][cls] += latency
            self.chist[b][cls][bucket_index(latency)] += 1
            if tseq != (0, 0) and self.rng.random() < self.sample:
                self.traces.append(TraceSample(table_epoch=tseq[0], table_seq=tseq[1], backend=b, cls=cls,
                                               latency=latency, ok=ok))

    def report(self, now: float) -> WorkerStats:
        self.run_until(now)
        self.seq += 1
        backends = [
            BackendStats(name=s.name, weight=1, requests=self.requests[i], responses=list(self.responses[i]),
                         connect_errors=0, timeouts=0, retries=0, resets=0, inflight=len(self.finishes[i]),
                         idle=0, ewma=s.service * self.slow_factor[i], class_responses=list(self.cresp[i]),
                         class_errors=list(self.cerr[i]), class_latency_sum=list(self.clsum[i]),
                         class_latency=[list(h) for h in self.chist[i]])
            for i, s in enumerate(self.specs)
        ]
        traces, self.traces = self.traces, []
        return WorkerStats(slot=0, pid=self.pid, generation=1, seq=self.seq, ts=now, classes=list(self.classes),
                           backends=backends, connections=1, accepted=1, requests=sum(self.requests), rejected=0,
                           timeouts=0, no_backend=0, traces=traces)


DEMO_LIKE = [
    SynthBackend("fast", capacity=16, service=0.004),
    SynthBackend("slow", capacity=8, service=0.025),
    SynthBackend("medium", capacity=16, service=0.008),
    SynthBackend("failing", capacity=16, service=0.003, fail_rate=0.8),
]


def config(backends: list[SynthBackend] = DEMO_LIKE, *, classes: tuple[str, ...] = ("heavy",), **learning):
    """A validated `lb.core.config.Config` naming the synthetic backends (addresses are unused)."""
    from lb.core.config import from_dict

    return from_dict({
        "backends": [{"address": f"127.0.0.1:{19000 + i}", "name": b.name} for i, b in enumerate(backends)],
        "classes": [{"name": c, "path_prefix": f"/{c}"} for c in classes],
        "learning": learning,
    })


def run(engine, worker: SyntheticWorker, seconds: float, *, start: float = 0.0, interval: float = 0.1,
        epoch: int = 1, seq: int = 0):
    """Drive an Engine with a synthetic worker (simulated time); returns the last table."""
    t, table = start, None
    while t < start + seconds - 1e-9:
        t += interval
        engine.ingest(worker.report(t), t)
        seq += 1
        table = engine.tick(t, epoch, seq)
        worker.table = table
    return table
