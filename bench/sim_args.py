"""The command line of the simulator (bench/sim.py): its arguments and
their checks."""

from __future__ import annotations

import argparse
import os

import scenarios as scn  # bench/scenarios.py
from sim_model import POLICIES  # bench/sim_model.py


def parse_args(argv=None, description: str = ""):
    """bench/sim.py's arguments, checked (a bad one exits 2 with the reason)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--scenario", default="all",
                    help=f"comma-separated subset of {', '.join(scn.SCENARIOS)}, fleet<seed> "
                         "(a generated training fleet, bench/fleets.py), or 'all' (default)")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="comma-separated subset of " + ",".join(POLICIES))
    ap.add_argument("--duration", type=float, default=60.0, help="simulated seconds (default 60)")
    ap.add_argument("--rate", type=float, help="base arrival rate, req/s (default: the scenario's)")
    ap.add_argument("--workers", type=int, default=1, help="simulated lb workers per instance (default 1)")
    ap.add_argument("--instances", type=int,
                    help="lb instances sharing the fleet (default: the scenario's, 1 but for twolb)")
    ap.add_argument("--seed", type=int, default=1, help="seed (default 1)")
    ap.add_argument("--timeout", type=float, default=2.0, help="client timeout, s (default 2)")
    ap.add_argument("--model", help="ONNX model for ml (default: the inference default)")
    ap.add_argument("--traces", metavar="DIR",
                    help="write sampled request traces (the inference process's "
                         "format, for `lb train`) to DIR/sim-SCENARIO-POLICY-seedN.npz")
    ap.add_argument("--exploration", type=float,
                    help="ml: learning.exploration (default: lb's, 0.05)")
    ap.add_argument("--capacity-explore", type=float, metavar="SHARE",
                    help="ml: capacity.explore (default: lb's, 0 = off)")
    ap.add_argument("--json", metavar="FILE", help="write the summaries as JSON")
    ap.add_argument("--markdown", action="store_true", help="print the overview as Markdown too")
    args = ap.parse_args(argv)
    names = list(scn.SCENARIOS) if args.scenario == "all" else \
        [n.strip() for n in args.scenario.split(",") if n.strip()]
    args.scenarios = []
    for n in names:
        try:
            args.scenarios.append(scn.get(n))
        except ValueError as exc:
            ap.error(f"--scenario: {exc}")
    if not args.scenarios:
        ap.error("--scenario: none given")
    if args.instances is not None and not 1 <= args.instances <= 8:
        ap.error("--instances must be between 1 and 8")
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in args.policies if p not in POLICIES]
    if bad or not args.policies:
        ap.error(f"--policies: unknown {bad} (choose from {', '.join(POLICIES)})")
    if args.duration <= 0 or (args.rate is not None and args.rate <= 0) or args.timeout <= 0:
        ap.error("--duration, --rate and --timeout must be > 0")
    if not 1 <= args.workers <= 64:
        ap.error("--workers must be between 1 and 64")
    if args.exploration is not None and not 0 <= args.exploration <= 0.5:
        ap.error("--exploration must be between 0 and 0.5")
    if args.capacity_explore is not None and not 0 <= args.capacity_explore <= 0.05:
        ap.error("--capacity-explore must be between 0 and 0.05")
    if args.model and not os.path.isfile(args.model):
        ap.error(f"--model {args.model}: no such file")
    return args
