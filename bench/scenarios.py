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
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

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

    def rate_at(self, frac: float, base: float) -> float:
        r = base
        for b in self.bursts:
            if b.start <= frac < b.end:
                r *= b.factor
        return r


def _same(n: int, capacity: int, median_ms: float, prefix: str = "b") -> list[BackendSpec]:
    return [BackendSpec(f"{prefix}{i + 1}", capacity, median_ms) for i in range(n)]


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
    )
}


def get(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r} (choose from {', '.join(SCENARIOS)})") from None


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
    return spec.median_ms * 1e-3 * COSTS[cls] * slow * math.exp(rng.gauss(0.0, spec.sigma))


@dataclass
class Summary:
    """What the tables show for one policy in one scenario."""

    policy: str
    requests: int
    p50: float
    p99: float
    p999: float
    error_rate: float
    share: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def as_dict(self) -> dict:
        return {"policy": self.policy, "requests": self.requests, "p50_s": self.p50,
                "p99_s": self.p99, "p999_s": self.p999, "error_rate": self.error_rate,
                "share": self.share, "note": self.note}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def summarize(policy: str, records: list[tuple[float, float, int, str]],
              backends: list[str], note: str = "") -> Summary:
    """records: (scheduled time, latency s, status (0 = no response / timeout), backend name).

    Latency percentiles are over every request, failed ones included (a fast
    503 is fast; a timeout counts at its timeout), so a policy cannot look
    good by failing quickly: the error rate stands next to them.
    """
    lat = sorted(r[1] for r in records)
    n = len(records)
    errors = sum(1 for r in records if r[2] == 0 or r[2] >= 500)
    counts = {b: 0 for b in backends}
    for r in records:
        if r[3] in counts:
            counts[r[3]] += 1
    share = {b: (c / n if n else 0.0) for b, c in counts.items()}
    return Summary(policy, n, percentile(lat, 0.5), percentile(lat, 0.99),
                   percentile(lat, 0.999), errors / n if n else 0.0, share, note)


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
            m = spec.median_ms * slow
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


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 1000:
        return f"{seconds:.2f}s"
    if ms >= 100:
        return f"{ms:.0f}ms"
    return f"{ms:.1f}ms"


def table(sc: Scenario, rows: list[Summary], markdown: bool = False) -> str:
    """The per-scenario table: policy, p50, p99, p99.9, error rate, share per backend."""
    names = [b.name for b in sc.backends]
    head = ["policy", "p50", "p99", "p99.9", "errors"] + [f"% {n}" for n in names]
    body = []
    for s in rows:
        cells = [s.policy + (f" ({s.note})" if s.note else ""), fmt_ms(s.p50), fmt_ms(s.p99),
                 fmt_ms(s.p999), f"{s.error_rate * 100:.2f}%"]
        cells += [f"{s.share.get(n, 0.0) * 100:.1f}" for n in names]
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c) + " |" for c in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = "  ".join(("{:<%d}" if i == 0 else "{:>%d}") % w for i, w in enumerate(widths))
    lines = [fmt.format(*head), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [fmt.format(*c) for c in body]
    return "\n".join(lines)
