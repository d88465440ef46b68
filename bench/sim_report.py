"""The simulator's overview over scenarios: one line per scenario, each
policy's tail latency and errors, and the table-routed policies' p99 against
the best of the others (bench/sim.py prints it after the per-scenario tables).
"""

from __future__ import annotations

from sim_model import ABLATIONS, CURVE_POLICIES  # bench/sim_model.py

ERROR_SLACK = 0.001  # overview: error rates within 0.1 point count as equal


def overview(results: dict, policies: list[str], markdown: bool = False) -> str:
    """One line per scenario: each policy's p99 / p99.9 (ms) and error rate, and
    for each table-routed policy its p99 over the best p99 of the others that
    fail no more requests than it does (ERROR_SLACK aside; the ablations are
    not among "others": they are not lb strategies)."""
    shipped = [p for p in policies if p not in ABLATIONS]
    ratios = [p for p in policies if p in CURVE_POLICIES]
    head = ["scenario"] + list(policies) + [f"{p} / best" for p in ratios]
    body = []
    for name, res in results.items():
        by = {r["policy"]: r for r in res["rows"]}
        cells = [name]
        for p in policies:
            r = by[p]
            err = f" {r['error_rate'] * 100:.1f}%" if r["error_rate"] >= 0.0005 else ""
            cells.append(f"{r['p99_s'] * 1e3:.1f} / {r['p999_s'] * 1e3:.0f}{err}")
        for p in ratios:
            # a policy that fails more requests is no bar for p99: fast errors are fast
            others = [by[o]["p99_s"] for o in shipped if o != "ml"
                      and by[o]["error_rate"] <= by[p]["error_rate"] + ERROR_SLACK]
            if not [o for o in shipped if o != "ml"]:
                cells.append("-")
            elif not others:
                cells.append("fewest errors")
            else:
                cells.append(f"{by[p]['p99_s'] / min(others):.2f}x" if min(others) > 0 else "-")
        body.append(cells)
    title = "p99 / p99.9 in ms (errors when any)"
    if markdown:
        return "\n".join([title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = "  ".join(("{:<%d}" if i == 0 else "{:>%d}") % w for i, w in enumerate(widths))
    return "\n".join([title, fmt.format(*head), "-" * (sum(widths) + 2 * (len(widths) - 1))]
                     + [fmt.format(*c) for c in body])
