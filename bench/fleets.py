"""Random training fleets: the scenarios the default model is trained on.

`generate(seed)` draws one `scenarios.Scenario` from a seed, plain data that
the simulator (`bench/sim.py`), the real-process benchmark
(`bench/quality.py --scenario fleet<seed>`) and the scenario backends
(`bench/scenario_backend.py`) all take.  A fleet has:

  * 1 to 256 backends (log-uniform), made of 1 to 4 kinds (a kind: a median
    service time, a concurrency capacity, per-class costs, a lognormal shape)
    with a little jitter per backend;
  * a spread of median service times up to 32x between the fastest and the
    slowest kind, capacities 1 to 32 (smaller ranges in large fleets, so that
    the arrival rate stays simulable);
  * the two request classes with per-kind costs: by default heavy requests
    cost HEAVY_COST x light ones, but some kinds are fast for one class and
    slow for the other;
  * sometimes: slowdowns and recoveries (phases of 2x to 20x), fast failures
    (a share of 503s in no time), backends that join late (and start slow),
    configured weights that follow the capacity (or do not), arrival bursts;
  * an arrival rate of 30% to 95% of the fleet's class-blind capacity
    (`scenarios.capacity_rate`), at most MAX_RATE requests/s (slower
    service times instead).

Seeds.  TRAINING_SEEDS (1000-1999) make the training fleets;
EVALUATION_SEEDS (1-99) are kept for judging on random fleets the model never
saw, beside the fixed evaluation set (`scenarios.SCENARIOS`, which no
generated fleet is: they are hand-made).  The two ranges are disjoint
(tests/process/test_fleets.py checks it); `scripts/make-training-traces` refuses a
seed outside TRAINING_SEEDS.
"""

from __future__ import annotations

import math
import random

import scenarios as scn  # bench/scenarios.py

TRAINING_SEEDS = range(1000, 2000)
EVALUATION_SEEDS = range(1, 100)
assert not set(TRAINING_SEEDS) & set(EVALUATION_SEEDS)

MAX_BACKENDS = 256
MAX_SPREAD = 32.0  # slowest kind's median / fastest kind's
MAX_RATE = 3000.0  # requests/s; a faster fleet gets slower service times instead
LOAD = (0.3, 0.95)  # arrival rate as a share of the fleet's class-blind capacity


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _kind(rng: random.Random, fastest_ms: float, spread: float, max_cap: int, u: float) -> dict:
    """One kind of backend; `u` in [0, 1] places its median within the spread."""
    costs = (1.0, scn.HEAVY_COST)
    r = rng.random()
    if r < 0.2:  # fast for heavy requests, slow for light ones
        k = rng.uniform(2.0, 6.0)
        costs = (k, scn.HEAVY_COST / k)
    elif r < 0.35:  # the other way round: heavy requests much dearer than usual
        k = rng.uniform(2.0, 4.0)
        costs = (1.0 / k, scn.HEAVY_COST * k)
    return {
        "median": fastest_ms * spread ** u,
        "capacity": max(1, min(max_cap, int(round(_log_uniform(rng, 1, max_cap + 0.49))))),
        "costs": tuple(round(c, 3) for c in costs),
        "sigma": rng.uniform(0.1, 0.6),
    }


def _phases(rng: random.Random, p_slow: float, p_fail: float, join_at: float) -> tuple[scn.Phase, ...]:
    out = []
    for _ in range(2):
        if rng.random() < p_slow:
            start = rng.uniform(max(0.05, join_at), 0.85)
            out.append(scn.Phase(round(start, 3), round(min(1.0, start + rng.uniform(0.05, 0.4)), 3),
                                 slow=round(_log_uniform(rng, 2.0, 20.0), 2)))
    if rng.random() < p_fail:
        start = rng.choice((0.0, rng.uniform(0.05, 0.8)))
        out.append(scn.Phase(round(start, 3), round(min(1.0, start + rng.uniform(0.1, 1.0)), 3),
                             fail=round(rng.uniform(0.2, 1.0), 2)))
    return tuple(out)


def generate(seed: int) -> scn.Scenario:
    """The fleet of `seed`: the same seed gives the same Scenario."""
    rng = random.Random(seed * 2_654_435_761 % (1 << 61))
    n = min(MAX_BACKENDS, max(1, int(_log_uniform(rng, 1, MAX_BACKENDS + 1))))
    spread = _log_uniform(rng, 1.0, MAX_SPREAD)
    fastest = _log_uniform(rng, 1.0, 10.0)
    # large fleets get small capacities, or no simulator could keep up with their rate
    max_cap = max(1, min(32, int(1024 / n)))
    n_kinds = rng.randint(1, min(4, n))
    # the fastest and the slowest kind span the spread; the others fall between
    us = [0.0, 1.0][:n_kinds] + [rng.random() for _ in range(n_kinds - 2)]
    kinds = [_kind(rng, fastest, spread, max_cap, u) for u in us]
    heavy_share = rng.uniform(0.05, 0.5)
    p_slow = rng.choice((0.0, 0.0, 0.05, 0.15, 0.3))
    p_fail = rng.choice((0.0, 0.0, 0.0, 0.05, 0.15))
    p_late = rng.choice((0.0, 0.0, 0.05, 0.2))
    weights = rng.choice(("equal", "equal", "equal", "capacity", "random"))
    backends = []
    for i in range(n):
        kind = kinds[i] if i < n_kinds else rng.choice(kinds)
        jitter = _log_uniform(rng, 0.85, 1.18)
        join_at = round(rng.uniform(0.1, 0.6), 3) if n > 1 and i > 0 and rng.random() < p_late else 0.0
        phases = _phases(rng, p_slow, p_fail, join_at)
        if join_at and rng.random() < 0.5:  # a cold start: slow for a while after joining
            phases += (scn.Phase(join_at, round(min(1.0, join_at + rng.uniform(0.05, 0.2)), 3),
                                 slow=round(rng.uniform(1.5, 4.0), 2)),)
        backends.append(dict(kind, median=kind["median"] * jitter, join_at=join_at, phases=phases))
    specs = _specs(backends, weights, rng, scale=1.0)
    load = rng.uniform(*LOAD)
    rate = load * scn.capacity_rate(specs, heavy_share)
    if rate > MAX_RATE:
        # keep the rate simulable: fewer requests in service at once first (the
        # same shape of fleet), then proportionally slower service for the rest
        f = rate / MAX_RATE
        for b in backends:
            b["capacity"] = max(1, int(round(b["capacity"] / f)))
        specs = _specs(backends, weights, rng, scale=1.0, like=specs)
        rate = load * scn.capacity_rate(specs, heavy_share)
        if rate > MAX_RATE:
            specs = _specs(backends, weights, rng, scale=rate / MAX_RATE, like=specs)
        rate = min(rate, MAX_RATE)
    bursts: tuple[scn.Burst, ...] = ()
    if rng.random() < 0.25:
        starts = sorted(rng.uniform(0.05, 0.85) for _ in range(rng.randint(1, 3)))
        factor = min(rng.uniform(1.5, 3.0), 1.3 / load)  # at most 130% of capacity in a burst
        bursts = tuple(scn.Burst(round(s, 3), round(s + 0.1, 3), round(factor, 2)) for s in starts)
    desc = (f"generated fleet, seed {seed}: {n} backends of {n_kinds} kind(s), {spread:.1f}x spread, "
            f"{load:.0%} load, {heavy_share:.0%} heavy, weights {weights}")
    return scn.Scenario(f"fleet{seed}", desc, tuple(specs), rate=round(max(rate, 5.0), 1),
                        heavy_share=round(heavy_share, 3), bursts=bursts, seed=seed)


def _specs(backends: list[dict], weights: str, rng: random.Random, scale: float,
           like=None) -> list[scn.BackendSpec]:
    """BackendSpecs of the drawn backends, medians x `scale`; weights as in `like` if given."""
    out = []
    for i, b in enumerate(backends):
        median = round(b["median"] * scale, 3)
        if like is not None:
            w = like[i].weight
        elif weights == "capacity":  # what an operator who measured throughput would write
            top = max(x["capacity"] / x["median"] for x in backends)
            w = max(1, int(round(10 * b["capacity"] / b["median"] / top)))
        elif weights == "random":  # weights that no longer match the fleet
            w = rng.randint(1, 10)
        else:
            w = 1
        out.append(scn.BackendSpec(f"f{i + 1}", b["capacity"], median, sigma=round(b["sigma"], 3), weight=w,
                                   join_at=b["join_at"], phases=b["phases"], costs=b["costs"]))
    return out


def training_seeds(n: int, first: int = TRAINING_SEEDS.start) -> list[int]:
    """The first `n` training seeds from `first`; ValueError past the training range."""
    seeds = list(range(first, first + n))
    if not seeds or seeds[0] not in TRAINING_SEEDS or seeds[-1] not in TRAINING_SEEDS:
        raise ValueError(f"training seeds must lie in {TRAINING_SEEDS.start}-{TRAINING_SEEDS.stop - 1}")
    return seeds
