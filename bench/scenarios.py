"""Quality-benchmark scenarios: simulated backends and the traffic sent to them.

A scenario is plain data, shared by the real-process benchmark
(`bench/quality.py`, which serves it with `bench/scenario_backend.py` and
drives it with `bench/loadgen.py`) and by the discrete-event simulator
(`bench/sim.py`).  Both draw the same arrivals from `arrivals()` for a seed.

Every simulated backend has a concurrency capacity (at most `capacity`
requests in service, the rest wait in FIFO order) and a service time drawn
from a lognormal distribution around `median_ms`, multiplied by the cost of
the request class (`/heavy` costs HEAVY_COST times `/light`).  Phases change
a backend for a window of the run; their times are FRACTIONS of the run's
duration, so a 10 s run and a 60 s simulation show the same story.

A scenario also says where the tables' yardsticks are: when a backend that
is serving slows down (`slowdowns`, for the time to divert) and the latency
no router can beat (`floor`).  The summaries and tables themselves are in
`bench/scenario_report.py`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from scenario_report import Summary, fmt_ms, had_share, percentile, time_to_divert  # bench/scenario_report.py

# Request classes: index -> URL path.  The cost multiplies the service time.
# The names are lb's: class 0 is "default" (no [[classes]] rule matched), and
# the generated lb config has one rule, path_prefix "/heavy" -> "heavy".
CLASSES = ("default", "heavy")
PATHS = ("/light", "/heavy")
HEAVY_COST = 5.0
COSTS = (1.0, HEAVY_COST)

FAIL_STATUS = 503


@dataclass(frozen=True)
class Phase:
    """Between `start` and `end` (fractions of the run) the backend is changed."""

    start: float
    end: float
    slow: float = 1.0  # service-time multiplier
    fail: float = 0.0  # probability of answering FAIL_STATUS at once (no service time)


@dataclass(frozen=True)
class BackendSpec:
    name: str
    capacity: int  # requests in service at once; the rest queue
    median_ms: float  # service time of a light request (median)
    sigma: float = 0.3  # lognormal shape of the service time
    weight: int = 1  # configured weight (what the operator wrote)
    join_at: float = 0.0  # fraction of the run before which connections are refused
    phases: tuple[Phase, ...] = ()
    costs: tuple[float, ...] = ()  # service-time multiplier per class (empty: COSTS)

    def cost(self, cls: int) -> float:
        return (self.costs or COSTS)[cls]

    def mix_cost(self, heavy_share: float) -> float:
        """The mean cost of a request of the class mix with `heavy_share` heavy ones."""
        return (1.0 - heavy_share) * self.cost(0) + heavy_share * self.cost(1)

    def mean_service(self, cost: float, slow: float = 1.0) -> float:
        """Mean seconds of service (the lognormal's mean, not its median) of a
        request of `cost`, `slow` times slower than normal."""
        return self.median_ms * 1e-3 * cost * slow * math.exp(self.sigma ** 2 / 2)

    def factors(self, frac: float) -> tuple[float, float]:
        """(slow multiplier, fail probability) at `frac` of the run."""
        slow, fail = 1.0, 0.0
        for p in self.phases:
            if p.start <= frac < p.end:
                slow *= p.slow
                fail = max(fail, p.fail)
        return slow, fail

    def describe(self) -> str:
        s = f"{self.name}: {self.capacity} x {self.median_ms:g} ms"
        if self.costs:
            s += " (" + ", ".join(f"{CLASSES[i]} x{c:g}" for i, c in enumerate(self.costs)) + ")"
        if self.weight != 1:
            s += f", weight {self.weight}"
        if self.join_at:
            s += f", joins at {self.join_at:.0%}"
        for p in self.phases:
            if p.slow != 1.0:
                s += f", {p.slow:g}x slower {p.start:.0%}-{p.end:.0%}"
            if p.fail:
                s += f", fails {p.fail:.0%} fast {p.start:.0%}-{p.end:.0%}"
        return s


@dataclass(frozen=True)
class Burst:
    start: float  # fractions of the run
    end: float
    factor: float  # arrival-rate multiplier


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    backends: tuple[BackendSpec, ...]
    rate: float  # base arrival rate, requests/s
    heavy_share: float = 0.2
    bursts: tuple[Burst, ...] = ()
    seed: int = 1
    instances: int = 1  # lb instances sharing the fleet, each with its own workers and tables

    def rate_at(self, frac: float, base: float) -> float:
        r = base
        for b in self.bursts:
            if b.start <= frac < b.end:
                r *= b.factor
        return r


def _same(n: int, capacity: int, median_ms: float, prefix: str = "b") -> list[BackendSpec]:
    return [BackendSpec(f"{prefix}{i + 1}", capacity, median_ms) for i in range(n)]


def capacity_rate(backends, heavy_share: float) -> float:
    """Requests/s the backends complete when each serves the class mix at full
    concurrency (no phases): sum of capacity / mean service time.  A router that
    sends each class where it is cheap can do better on fleets with per-class
    costs; this is the class-blind figure arrival rates are set against."""
    total = 0.0
    for spec in backends:
        total += spec.capacity / spec.mean_service(spec.mix_cost(heavy_share))
    return total


def _spread(n: int, capacity: int, fastest_ms: float, ratio: float) -> tuple[BackendSpec, ...]:
    """n backends whose medians run geometrically from `fastest_ms` to `ratio` x it."""
    return tuple(BackendSpec(f"s{i + 1}", capacity,
                             round(fastest_ms * ratio ** (i / max(n - 1, 1)), 2)) for i in range(n))


def _drift(n: int = 6, segments: int = 12, seed: int = 5) -> tuple[BackendSpec, ...]:
    """n identical backends whose speeds change every 1/segments of the run:
    in each segment two of them (drawn anew) are 3x or 6x slower and a third
    1.5x; at 30 s that is a change every 2.5 s, at 10 s every 0.8 s."""
    rng = random.Random(seed)
    slow = [[1.0] * segments for _ in range(n)]
    for k in range(segments):
        picked = rng.sample(range(n), 3)
        for b, f in zip(picked, (rng.choice((3.0, 6.0)), rng.choice((3.0, 6.0)), 1.5)):
            slow[b][k] = f
    out = []
    for b in range(n):
        phases = tuple(Phase(k / segments, (k + 1) / segments, slow=slow[b][k])
                       for k in range(segments) if slow[b][k] != 1.0)
        out.append(BackendSpec(f"d{b + 1}", 4, 5.0, phases=phases))
    return tuple(out)


def _at_load(backends: tuple[BackendSpec, ...], heavy_share: float, load: float) -> float:
    """The arrival rate that is `load` of the fleet's class-blind capacity (rounded)."""
    return float(round(load * capacity_rate(backends, heavy_share), -1))


_SPREAD16 = _spread(16, 2, 4.0, 16.0)
_SPREAD64 = _spread(64, 1, 8.0, 16.0)
_AFFINITY = (
    *(BackendSpec(f"light{i + 1}", 4, 5.0, costs=(1.0, 8.0)) for i in range(4)),
    *(BackendSpec(f"heavy{i + 1}", 4, 5.0, costs=(4.0, 2.0)) for i in range(4)),
)
_DRIFT = _drift()


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "heterogeneous",
            "four backends of very different capacity and speed, equal configured weights",
            (
                BackendSpec("big", 16, 3.0),
                BackendSpec("medium", 8, 6.0),
                BackendSpec("small", 4, 12.0),
                BackendSpec("tiny", 2, 20.0),
            ),
            rate=800,
        ),
        Scenario(
            "slowdown",
            "four identical backends; one is 10x slower from 30% to 60% of the run",
            (
                *_same(3, 8, 5.0),
                BackendSpec("b4", 8, 5.0, phases=(Phase(0.3, 0.6, slow=10.0),)),
            ),
            rate=800,
        ),
        Scenario(
            "fastfail",
            "four identical backends; one answers 503 in well under 1 ms to 90% of requests",
            (
                *_same(3, 8, 5.0),
                BackendSpec("b4", 8, 5.0, phases=(Phase(0.0, 1.0, fail=0.9),)),
            ),
            rate=800,
        ),
        Scenario(
            "identical",
            "four identical backends",
            tuple(_same(4, 8, 5.0)),
            rate=800,
        ),
        Scenario(
            "coldjoin",
            "three busy backends; a fourth refuses connections until 40% of the run, "
            "then joins 3x slower until 55%",
            (
                *_same(3, 4, 5.0),
                BackendSpec("b4", 4, 5.0, join_at=0.4, phases=(Phase(0.4, 0.55, slow=3.0),)),
            ),
            rate=800,
        ),
        Scenario(
            "bursts",
            "two fast and two slower backends; traffic triples three times for 10% of the run",
            (
                *_same(2, 8, 4.0, "fast"),
                *_same(2, 4, 8.0, "slow"),
            ),
            rate=400,
            bursts=(Burst(0.2, 0.3, 3.0), Burst(0.5, 0.6, 3.0), Burst(0.8, 0.9, 3.0)),
        ),
        # -- added to the evaluation set; nothing was tuned on these ----------------------
        Scenario(
            "spread16",
            "16 backends, medians 4 to 64 ms (16x spread), 2 requests in service each; "
            "70% of the class-blind capacity",
            _SPREAD16,
            rate=_at_load(_SPREAD16, 0.2, 0.7),
        ),
        Scenario(
            "spread64",
            "64 backends, medians 8 to 128 ms (16x spread), 1 request in service each; "
            "70% of the class-blind capacity",
            _SPREAD64,
            rate=_at_load(_SPREAD64, 0.2, 0.7),
        ),
        Scenario(
            "affinity",
            "two kinds of backend: four serve light requests in 5 ms and heavy ones in 40 ms, "
            "four serve light ones in 20 ms and heavy ones in 10 ms; half the requests are heavy",
            _AFFINITY,
            rate=1000,
            heavy_share=0.5,
        ),
        Scenario(
            "drift",
            "six identical backends; every 1/12 of the run two others are 3x or 6x slower "
            "and a third 1.5x",
            _DRIFT,
            rate=1200,
        ),
        Scenario(
            "twolb",
            "the heterogeneous fleet behind two lb instances, each with its own workers and "
            "tables, each taking half of the arrivals",
            (
                BackendSpec("big", 16, 3.0),
                BackendSpec("medium", 8, 6.0),
                BackendSpec("small", 4, 12.0),
                BackendSpec("tiny", 2, 20.0),
            ),
            rate=800,
            instances=2,
        ),
    )
}

# The six scenarios the shipped model's trace was captured on and the policy
# constants were tuned on; the rest of SCENARIOS is held out.
TUNED_ON = ("heterogeneous", "slowdown", "fastfail", "identical", "coldjoin", "bursts")


def get(name: str) -> Scenario:
    """An evaluation scenario by name, or a generated training fleet `fleet<seed>`."""
    if name in SCENARIOS:
        return SCENARIOS[name]
    if name.startswith("fleet") and name[5:].isdigit():
        import fleets  # bench/fleets.py (imports this module)

        return fleets.generate(int(name[5:]))
    if name.startswith("steady") and name[6:].isdigit():
        import capacity_bench  # bench/capacity_bench.py: fleets of known capacity

        return capacity_bench.steady_fleet(int(name[6:]))
    raise ValueError(f"unknown scenario {name!r} (choose from {', '.join(SCENARIOS)}, "
                     f"or fleet<seed> for a generated training fleet)")


def arrivals(sc: Scenario, duration: float, rate: float | None = None,
             seed: int | None = None, poisson: bool = True) -> list[tuple[float, int]]:
    """The requests of one run: (send time in seconds from the start, class index).

    Open loop: the schedule does not depend on how fast anything answers.
    Poisson arrivals (or evenly spaced ones) at the scenario's rate, times its
    burst factor; a class is drawn per request.  Same inputs, same list.
    """
    base = sc.rate if rate is None else rate
    if base <= 0 or duration <= 0:
        raise ValueError("rate and duration must be > 0")
    rng = random.Random(sc.seed * 1_000_003 + 17 if seed is None else seed)
    out: list[tuple[float, int]] = []
    t = 0.0
    heavy = sc.heavy_share
    while True:
        r = sc.rate_at(t / duration, base)
        t += rng.expovariate(r) if poisson else 1.0 / r
        if t >= duration:
            return out
        out.append((t, 1 if rng.random() < heavy else 0))


def run_schedule(sc: Scenario, duration: float, rate: float | None, seed: int) -> list[tuple[float, int]]:
    """The arrivals of one benchmark or simulator run with `seed`: the same list
    for the real benchmark, the simulator and the floor."""
    return arrivals(sc, duration, rate, seed=sc.seed * 7919 + seed)


def service_time(spec: BackendSpec, cls: int, slow: float, rng: random.Random) -> float:
    """Seconds of service for one request of class `cls`."""
    return spec.median_ms * 1e-3 * spec.cost(cls) * slow * math.exp(rng.gauss(0.0, spec.sigma))


# -- time to divert and the floor ----------------------------------------------------------------


def slowdowns(sc: Scenario, min_factor: float = 2.0) -> list[tuple[str, float, float]]:
    """(backend, start, end) as fractions of the run: every moment a backend that
    is already serving becomes at least `min_factor` x slower than just before,
    and when that ends (its factor drops back below the new one)."""
    out = []
    for spec in sc.backends:
        edges = sorted({p.start for p in spec.phases} | {p.end for p in spec.phases})
        for t in edges:
            if t <= spec.join_at or t >= 1.0:
                continue
            before, after = spec.factors(t - 1e-9)[0], spec.factors(t)[0]
            if after < min_factor * before:
                continue
            end = next((e for e in edges if e > t and spec.factors(e)[0] < after), 1.0)
            out.append((spec.name, t, end))
    return out


def divert_times(sc: Scenario, records, duration: float) -> list[float | None]:
    """time_to_divert for every slowdown of the scenario (seconds, None: never)
    in which the backend had a share to lose (`had_share`)."""
    return [time_to_divert(records, name, a * duration, b * duration)
            for name, a, b in slowdowns(sc) if had_share(records, name, a * duration)]


def floor(sc: Scenario, schedule: list[tuple[float, int]], duration: float,
          seed: int = 1) -> Summary:
    """The latency no router can beat: every request served alone, at once,
    by the fastest backend that is up and not failing at its send time.

    Service times are drawn as the backends draw them (same lognormal shape),
    with no queueing and no network.  A policy whose p99 sits on this floor
    leaves nothing for a better policy to win on that percentile.
    """
    rng = random.Random(seed * 7 + 3)
    lat = []
    for t, cls in schedule:
        frac = t / duration
        best = None
        for spec in sc.backends:
            if frac < spec.join_at:
                continue
            slow, fail = spec.factors(frac)
            if fail >= 1.0:
                continue
            m = spec.median_ms * slow * spec.cost(cls)
            if best is None or m < best[0]:
                best = (m, spec, slow)
        if best is not None:
            lat.append(service_time(best[1], cls, best[2], rng))
    lat.sort()
    return Summary("floor", len(lat), percentile(lat, 0.5), percentile(lat, 0.99),
                   percentile(lat, 0.999), 0.0)


def floor_line(s: Summary) -> str:
    return (f"floor (each request alone on the fastest healthy backend): p50 {fmt_ms(s.p50)}, "
            f"p99 {fmt_ms(s.p99)}, p99.9 {fmt_ms(s.p999)}")
