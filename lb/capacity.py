"""Capacity of a backend from its load curves: the request rate at which its
p99 latency would cross the objective.

I/O-free.  What the workers learn of a backend (workers/loadcurve.py) is a
slot count (how many requests it serves at once; each worker learns its own
share, so the shares add up) and a service time per request class (latency of
requests sent to a free slot).  With `k` slots and a mean service time `s`
for the current class mix, the backend saturates at k / s requests per second;
below that, requests queue as in a k-server queue (Erlang C, Poisson
arrivals), and the objective is met while

    service p99 + wait p99 <= slo

where the wait's p99 is (1 + cv2) / 2 x ln(C / 0.01) / (k / s - rate) when
the probability C of waiting at all exceeds 1% (cv2: the service times'
squared coefficient of variation, read from the p99/p50 ratio of the latency
observed as a lognormal's), and the service's p99 is the mean service times
that ratio.  The rate
that meets it is found by bisection, for the integer slot counts on either
side of a fractional one, then interpolated.

A slot count is only known up to the load the backend was seen at: when the
curves never saw it queue (their fit is at or above the highest in-flight
count with answers), the capacity is a lower bound, reported with
`known = False`.

The fleet is more than the sum of its backends (`fleet_capacity`): a
balancer that sends each request where it waits least pools their slots, so
the fleet queues like one k-server queue with all their slots, the mean
service of their throughput at saturation and the spread of that mixture of
service times.  Each backend alone at its own capacity is a split the
balancer could also make, so the fleet's capacity is the larger of the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

MIN_SLOTS = 1.0


@dataclass
class Estimate:
    capacity_rps: float  # at the objective
    saturation_rps: float  # k / s
    slots: float
    service_s: float
    service_p99_s: float
    known: bool  # the curves saw the backend queue: the slot count is measured, not a lower bound
    note: str = ""

    def as_dict(self) -> dict:
        return {"capacity_rps": round(self.capacity_rps, 3), "saturation_rps": round(self.saturation_rps, 3),
                "slots": round(self.slots, 2), "service_ms": round(self.service_s * 1000, 3),
                "service_p99_ms": round(self.service_p99_s * 1000, 3), "known": self.known,
                "note": self.note}


def erlang_c(k: int, a: float) -> float:
    """Probability that an arrival waits in an M/M/k queue with offered load a (< k)."""
    if a <= 0:
        return 0.0
    if a >= k:
        return 1.0
    term, total = 1.0, 1.0  # a^i / i!, summed for i < k
    for i in range(1, k):
        term *= a / i
        total += term
    last = term * a / k  # a^k / k!
    tail = last * k / (k - a)
    return tail / (total + tail)


def wait_p99(k: int, service: float, rate: float, cv2: float = 1.0) -> float:
    """The 99th percentile of the wait in a k-server queue with Poisson
    arrivals and service times of squared coefficient of variation cv2 (1:
    exponential, M/M/k exactly; otherwise the Allen-Cunneen scaling of the
    wait, (1 + cv2) / 2, applied to its exponential tail)."""
    mu = 1.0 / service
    if rate >= k * mu:
        return math.inf
    c = erlang_c(k, rate * service)
    return 0.0 if c <= 0.01 else (1 + cv2) / 2 * math.log(c / 0.01) / (k * mu - rate)


def _capacity(k: int, service: float, s99: float, slo: float, cv2: float) -> float:
    """The highest rate at which s99 + the wait p99 of k servers meets slo (bisection)."""
    lo, hi = 0.0, k / service
    for _ in range(50):
        mid = (lo + hi) / 2
        if s99 + wait_p99(k, service, mid, cv2) <= slo:
            lo = mid
        else:
            hi = mid
    return lo


def estimate(slots: float, service: float, p99_over_p50: float, slo: float, known: bool) -> Estimate:
    """`slots`: the fitted slot count (summed over workers); `service`: mean
    seconds of the class mix; `p99_over_p50`: of the observed latency; `slo`:
    seconds."""
    k = max(MIN_SLOTS, slots)
    sat = k / service
    s99 = service * min(max(p99_over_p50, 1.0), 20.0)
    if s99 >= slo:
        return Estimate(0.0, sat, k, service, s99, known, "its service alone exceeds the objective")
    # a fractional slot count: between the queues of its two neighbouring integers
    below = max(1, math.floor(k))
    frac = k - below
    # the service's variability from the same ratio, read as a lognormal's
    # (p99/p50 = exp(2.326 sigma)); capped, as queueing inflates the ratio
    sigma = min(math.log(min(max(p99_over_p50, 1.0), 20.0)) / 2.326, 1.5)
    cv2 = math.exp(sigma * sigma) - 1.0
    cap = _capacity(below, service, s99, slo, cv2)
    if frac > 0:
        cap = (1 - frac) * cap + frac * _capacity(below + 1, service, s99, slo, cv2)
    note = "" if known else "not seen under enough load to know its limit: at least this"
    return Estimate(cap, sat, k, service, s99, known, note)


_NORMAL = NormalDist()


def _mixture_ratio(parts: list[tuple[float, float, float]]) -> float:
    """p99 / p50 of a mixture of lognormals, `parts` = (weight, median, sigma)."""
    total = sum(w for w, _, _ in parts)
    cdf = _NORMAL.cdf
    logs = [(w, math.log(m), sg) for w, m, sg in parts]

    def below(x: float) -> float:
        lx = math.log(x)
        return sum(w * (cdf((lx - lm) / sg) if sg > 0 else float(lx >= lm)) for w, lm, sg in logs) / total

    def quantile(q: float) -> float:
        lo = min(m for _, m, _ in parts) * 1e-3
        hi = max(m * math.exp(5 * sg) for _, m, sg in parts) * 10
        for _ in range(60):  # bisection in log space: well under 0.1% relative
            mid = math.sqrt(lo * hi)
            if below(mid) < q:
                lo = mid
            else:
                hi = mid
        return hi

    return quantile(0.99) / quantile(0.5)


def fleet_capacity(estimates: list[Estimate], slo: float) -> float:
    """The fleet's rate within `slo`: the larger of its backends' capacities
    summed and of their slots pooled into one queue (see the module's doc)."""
    alone = sum(e.capacity_rps for e in estimates)
    live = [e for e in estimates if e.service_s > 0 and e.slots > 0]
    if len(live) < 2:
        return alone
    slots = sum(e.slots for e in live)
    sat = sum(e.saturation_rps for e in live)
    parts = []
    for e in live:
        # the spread each estimate was made with: service p99 = mean x exp(2.326 sigma)
        sigma = min(math.log(max(e.service_p99_s / e.service_s, 1.0)) / 2.326, 1.5)
        parts.append((e.saturation_rps, e.service_s * math.exp(-sigma * sigma / 2), sigma))
    pooled = estimate(slots, slots / sat, _mixture_ratio(parts), slo, True).capacity_rps
    return max(alone, pooled)
