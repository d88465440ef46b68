"""What the tables show for a run of a scenario: summaries of its records.

Records are what the real benchmark (`bench/quality.py`) and the simulator
(`bench/sim.py`) keep per request: (scheduled send time, latency in seconds,
status (0 = no response / timeout), backend name).  From them: a `Summary`
per policy (latency percentiles over every request, error rate, share per
backend), the time to divert after a slowdown, and the per-scenario table.
Nothing here builds a scenario: `bench/scenarios.py` says when its backends
slow down and where its floor is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scenarios import Scenario  # bench/scenarios.py


# -- time to divert ------------------------------------------------------------------------------

DIVERT_BEFORE = 1.0  # seconds before the slowdown its usual share is measured over
DIVERT_HOLD = 0.25  # seconds the share must stay low after the change for it to count
DIVERT_MIN = 10  # requests the backend must have had in the second before: else no share to lose


def _before(records, backend: str, start: float, before: float) -> tuple[int, int]:
    """Requests sent to `backend`, and in all, in the `before` seconds before `start`."""
    pre = [r[3] == backend for r in records if start - before <= r[0] < start]
    return sum(pre), len(pre)


def had_share(records: list[tuple[float, float, int, str]], backend: str, start: float,
              before: float = DIVERT_BEFORE, least: int = DIVERT_MIN) -> bool:
    """Whether `backend` had a share to lose when a slowdown began at `start`:
    at least `least` requests in the `before` seconds before it (else the
    policy was already keeping away from it, and there is no divert to time)."""
    return _before(records, backend, start, before)[0] >= least


def time_to_divert(records: list[tuple[float, float, int, str]], backend: str, start: float,
                   end: float, before: float = DIVERT_BEFORE,
                   hold: float = DIVERT_HOLD, least: int = DIVERT_MIN) -> float | None:
    """Seconds from `start` (a slowdown of `backend` begins) until the
    backend's share of the requests falls below half of its share over the
    `before` seconds before `start`; None if it does not before `end` (or
    not for `hold` seconds before it), or if the backend had no share to lose
    (`had_share`: callers leave those slowdowns out).

    The moment is the change point of the requests sent from `start` on
    (a CUSUM): with h half the share before, the running sum of (1 if a
    request went to the backend, else 0) - h rises while the backend gets
    more than h and falls once it gets less, and the divert is where the sum
    peaks.  Only requests sent after `start` count, so the reading does not
    depend on how the share happened to be spread over the moments before
    it: a policy that sends nothing more at once reads 0, one that keeps the
    backend's share until t and then stops reads t.

    records: (scheduled send time, latency, status, backend name), as the
    benchmark and the simulator keep them; shares are by send time."""
    mine, sent = _before(records, backend, start, before)
    if mine < least:
        return None
    half = 0.5 * mine / sent
    post = sorted((r[0], r[3] == backend) for r in records if start <= r[0] < end)
    cusum = peak = 0.0
    at = start
    for t, hit in post:
        cusum += hit - half
        if cusum > peak:
            peak, at = cusum, t
    # past the peak the backend gets less than h (the peak is the sum's
    # maximum); it must have done so for `hold` seconds before the end
    if at > end - hold:
        return None
    return at - start


def divert_cell(times: list[float | None]) -> str:
    """'0.31s' for one slowdown; 'median 0.4s, max 1.2s, 1 never' for several."""
    if not times:
        return ""
    got = sorted(t for t in times if t is not None)
    never = len(times) - len(got)
    if len(times) == 1:
        return fmt_ms(got[0]) if got else "never"
    parts = []
    if got:
        parts.append(f"median {fmt_ms(percentile(got, 0.5))}, max {fmt_ms(got[-1])}")
    if never:
        parts.append(f"{never} of {len(times)} never")
    return ", ".join(parts)


# -- summaries and the table ---------------------------------------------------------------------

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
    divert: list = field(default_factory=list)  # time_to_divert per slowdown (s, None: never)

    def as_dict(self) -> dict:
        return {"policy": self.policy, "requests": self.requests, "p50_s": self.p50,
                "p99_s": self.p99, "p999_s": self.p999, "error_rate": self.error_rate,
                "share": self.share, "note": self.note, "divert_s": self.divert}


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


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 1000:
        return f"{seconds:.2f}s"
    if ms >= 100:
        return f"{ms:.0f}ms"
    return f"{ms:.1f}ms"


MAX_SHARE_COLUMNS = 8  # more backends: the share of the fastest and slowest quarters instead


def table(sc: Scenario, rows: list[Summary], markdown: bool = False) -> str:
    """The per-scenario table: policy, p50, p99, p99.9, error rate, time to divert
    (scenarios with a slowdown), share per backend (or per quarter of the fleet
    by speed when it has more than MAX_SHARE_COLUMNS backends)."""
    names = [b.name for b in sc.backends]
    divert = any(s.divert for s in rows)
    head = ["policy", "p50", "p99", "p99.9", "errors"] + (["divert"] if divert else [])
    if len(names) <= MAX_SHARE_COLUMNS:
        groups = [(f"% {n}", [n]) for n in names]
    else:
        by_speed = [b.name for b in sorted(sc.backends, key=lambda b: b.median_ms * b.cost(0))]
        q = max(1, len(by_speed) // 4)
        groups = [("% fastest 1/4", by_speed[:q]), ("% slowest 1/4", by_speed[-q:])]
    head += [g[0] for g in groups]
    body = []
    for s in rows:
        cells = [s.policy + (f" ({s.note})" if s.note else ""), fmt_ms(s.p50), fmt_ms(s.p99),
                 fmt_ms(s.p999), f"{s.error_rate * 100:.2f}%"]
        if divert:
            cells.append(divert_cell(s.divert) or "-")
        cells += [f"{sum(s.share.get(n, 0.0) for n in g) * 100:.1f}" for _, g in groups]
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
