"""lb's capacity estimate against a measured ramp, on fleets of known capacity.

Each fleet (`steady<seed>`, generated here, served by bench/scenario_backend.py)
has 2-3 backends with a fixed concurrency limit and lognormal service time,
no phases, one request class: backend i saturates at capacity_i / mean
service_i requests per second.  Per fleet:

1. lb (strategy --strategy, ml by default; two workers; `capacity.explore`
   from --explore) in front
   of it takes Poisson traffic at
   LOAD (--load) x the fleet's saturation for WARM seconds ("ordinary
   traffic"), then
   GET /api/capacity gives the estimate, per backend and for the fleet;
2. the load then steps up (STEPS, fractions of saturation, STEP seconds each)
   until the p99 measured at the client crosses the objective: the last rate
   that met it is the fleet's measured capacity at the objective.

Printed per fleet: the estimate, the measured capacity and the error; what
lb's formula (lb/capacity.py) gives when fed the true slot counts, service
times and spreads (the error no reading of the curves can remove); and per
backend the estimate against that formula, with the slot count, service
time and p99 read against the true ones, and how many requests of the
ordinary traffic found all its slots taken (counted at the client: none
means that no reading of that traffic could see the backend's limit, and
lb's figure for it can only be a lower bound).  Develop on seeds
1000 and up; report seeds 1-99 (nothing here was tuned on them).

Usage: python bench/capacity_bench.py [--seeds 1,2] [--slo-ms 250] [--warm 60] [--load 0.45]
                                      [--explore 0] [--strategy ml]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import scenario_report as report  # noqa: E402  (bench/scenario_report.py)
import scenarios as scn  # noqa: E402
from loadgen import run_load  # noqa: E402
from procs import REPO_ROOT  # noqa: E402  (bench/procs.py)
from servers import free_ports  # noqa: E402

from lb import capacity  # noqa: E402  (lb/capacity.py: the formula lb uses)

LOAD = 0.45
STEPS = (0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1)  # (a 12 s step at saturation may not yet queue)
STEP = 12.0


def steady_fleet(seed: int) -> scn.Scenario:
    rng = random.Random(seed * 7919 + 3)
    n = rng.choice((2, 3))
    specs = tuple(scn.BackendSpec(f"c{i + 1}", rng.choice((1, 2, 4)), round(rng.uniform(8, 40), 1))
                  for i in range(n))
    sat = scn.capacity_rate(specs, 0.0)
    return scn.Scenario(f"steady{seed}", "static backends of known capacity", specs, rate=sat * LOAD,
                        heavy_share=0.0, seed=seed)


def saturation(spec: scn.BackendSpec) -> float:
    return scn.capacity_rate((spec,), 0.0)


def full_sends(records, name: str, slots: int) -> int:
    """How many of the ordinary traffic's requests to backend `name` found all
    its `slots` taken, as the client saw them (each from its send to its
    answer, which is longer than the backend holds it): 0 means no reading of
    that traffic, lb's or any other, could see where the backend queues."""
    spans = sorted((t, t + took) for t, took, status, backend in records if backend == name and status)
    ends: list[float] = []  # min-heap of the ends of the requests in flight
    full = 0
    for start, end in spans:
        while ends and ends[0] <= start:
            heapq.heappop(ends)
        full += len(ends) >= slots
        heapq.heappush(ends, end)
    return full


def model_estimate(spec: scn.BackendSpec, slo: float) -> capacity.Estimate:
    """The backend's estimate at `slo` by lb's own formula (lb/capacity.py) fed
    its true slot count, mean service time and spread: what a perfect reading
    of its curves would give (the fleet's ramp checks the formula itself)."""
    mean = spec.median_ms / 1000 * math.exp(spec.sigma ** 2 / 2)
    return capacity.estimate(spec.capacity, mean, math.exp(2.326 * spec.sigma), slo, True)


def _p99(records) -> tuple[float, float]:
    lat = sorted(r[1] for r in records if r[2] == 200)
    errors = sum(1 for r in records if r[2] != 200) / max(1, len(records))
    return (report.percentile(lat, 0.99) if lat else float("inf")), errors


def run_fleet(seed: int, slo: float, warm: float, python: str, explore: float = 0.0,
              strategy: str = "ml", load: float = LOAD) -> dict:
    sc = steady_fleet(seed)
    tmp = tempfile.mkdtemp(prefix="capacity-bench-")
    ports = free_ports(len(sc.backends) + 2)
    bports, lport, aport = ports[:-2], ports[-2], ports[-1]
    procs = []
    try:
        be = subprocess.Popen([python, os.path.join(REPO_ROOT, "bench", "scenario_backend.py"),
                               "--scenario", sc.name, "--ports", ",".join(map(str, bports)),
                               "--duration", "3600"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        procs.append(be)
        assert be.stdout.readline().strip() == b"ready"
        cfg = os.path.join(tmp, "lb.toml")
        with open(cfg, "w") as f:
            f.write(f'listen = "127.0.0.1:{lport}"\nstrategy = "{strategy}"\nworkers = 2\n'
                    f'[admin]\nlisten = "127.0.0.1:{aport}"\n[capacity]\nslo_p99_ms = {slo * 1000}\n'
                    f'explore = {explore}\n')
            for spec, p in zip(sc.backends, bports):
                f.write(f'[[backends]]\naddress = "127.0.0.1:{p}"\nname = "{spec.name}"\n')
        lb = subprocess.Popen([python, "-m", "lb", "run", "-c", cfg], cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(lb)
        _wait(aport)
        sat = sum(saturation(s) for s in sc.backends)
        records, _ = run_load(lport, scn.arrivals(sc, warm, sat * load, seed=seed))
        full = {spec.name: full_sends(records, spec.name, spec.capacity) for spec in sc.backends}
        with urllib.request.urlopen(f"http://127.0.0.1:{aport}/api/capacity", timeout=10) as r:
            view = json.loads(r.read())
        measured, ramp, crossed = 0.0, [], False
        for i, frac in enumerate(STEPS):
            rate = sat * frac
            records, _ = run_load(lport, scn.arrivals(sc, STEP, rate, seed=seed * 100 + i))
            p99, err = _p99(records)
            ramp.append((frac, rate, p99, err))
            if p99 > slo or err > 0.001:
                crossed = True
                break
            measured = rate
        return {"seed": seed, "fleet": [(s.name, s.capacity, s.median_ms, saturation(s)) for s in sc.backends],
                "saturation": sat, "estimate": view["fleet"]["capacity_rps"], "known": view["fleet"]["known"],
                "measured": measured, "crossed": crossed, "ramp": ramp, "backends": view["backends"],
                "full": full}
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("lb did not become healthy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1,2", help="comma-separated fleet seeds (report: 1-99)")
    ap.add_argument("--slo-ms", type=float, default=250.0)
    ap.add_argument("--warm", type=float, default=60.0, help="seconds of traffic at --load before the estimate")
    ap.add_argument("--load", type=float, default=LOAD,
                    help=f"the ordinary traffic, as a share of the fleet's saturation (default {LOAD})")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--strategy", default="ml", help="lb's strategy (default ml)")
    ap.add_argument("--explore", type=float, default=0.0,
                    help="lb's capacity.explore (share of picks that may measure slot counts; default 0, lb's)")
    args = ap.parse_args(argv)
    slo = args.slo_ms / 1000
    for seed in (int(s) for s in args.seeds.split(",")):
        r = run_fleet(seed, slo, args.warm, args.python, args.explore, args.strategy, args.load)
        est, meas = r["estimate"], r["measured"]
        err = (est / meas - 1) if est and meas else None
        print(f"steady{seed}: " + ", ".join(f"{n} {c} slots {m} ms (saturates at {s:.0f}/s)"
                                            for n, c, m, s in r["fleet"]))
        print(f"  after {args.warm:.0f} s at {args.load:.0%} load: estimate {est} req/s (known: {r['known']}); "
              f"measured at p99 <= {args.slo_ms:g} ms: {'' if r['crossed'] else 'at least '}{meas:.0f} req/s "
              f"({'-' if err is None else f'{err:+.0%}'}); fleet saturation {r['saturation']:.0f}")
        for frac, rate, p99, e in r["ramp"]:
            print(f"    ramp {frac:.0%} {rate:7.1f} req/s: p99 {p99 * 1000:7.1f} ms, errors {e:.2%}")
        specs = {s.name: s for s in steady_fleet(seed).backends}
        estimates = {name: model_estimate(spec, slo) for name, spec in specs.items()}
        models = {name: e.capacity_rps for name, e in estimates.items()}
        total = capacity.fleet_capacity(list(estimates.values()), slo)
        print(f"  the formula fed the true parameters: {total:.0f} req/s"
              + (f" ({total / meas - 1:+.0%} against the ramp: what a perfect reading would give)" if meas else ""))
        for name, b in r["backends"].items():
            spec = specs[name]
            model = models[name]
            print(f"    {name}: estimate {b['capacity_rps']:.1f} vs {model:.1f} ({b['capacity_rps'] / model - 1:+.0%}; "
                  f"known {b['known']}): slots {b['slots']} vs {spec.capacity}, service {b['service_ms']} vs "
                  f"{spec.median_ms * math.exp(spec.sigma ** 2 / 2):.1f} ms, p99 {b['service_p99_ms']} vs "
                  f"{spec.median_ms * math.exp(2.326 * spec.sigma):.1f} ms; saturation {saturation(spec):.1f}; "
                  f"requests that found its {spec.capacity} slots taken: {r['full'][name]}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
