"""One fuzz run (tests/process/test_fuzz.py): cases made from a seed, each
driven through lb as one client connection, then judged by the oracles
(tests/fuzz_oracles.py) against what the backend received; and its report.

Bounded and seeded: LB_FUZZ_SEED and LB_FUZZ_CASES widen a local run,
LB_FUZZ_BUDGET bounds each run's seconds, LB_FUZZ_ONLY=3,17 replays cases of
a seed.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

from tests.conftest import LBProc
from tests.fuzz_backend import FuzzBackend
from tests.fuzz_client import drive
from tests.fuzz_oracles import (
    canary,
    case_of,
    check_answers,
    check_canary_at_backend,
    check_fields,
    check_forwarded,
    same_request,
    targets,
)
from tests.fuzz_reference import Reference, reference
from tests.fuzz_requests import make_case

SEED = int(os.environ.get("LB_FUZZ_SEED", "20261130"))
CASES = int(os.environ.get("LB_FUZZ_CASES", "400"))
ONLY = {int(x) for x in os.environ.get("LB_FUZZ_ONLY", "").split(",") if x}  # re-run these cases
BUDGET = float(os.environ.get("LB_FUZZ_BUDGET", "18"))  # seconds per parse path: stop early past it

# Classes of input with a known open defect, kept out of the main run only
# while each has its own strict xfail test below (see `open_class`).
OPEN_CLASSES: frozenset = frozenset()


def open_class(ref: Reference) -> str | None:
    """The known-open class a case belongs to, if any."""
    body_before = False
    for r in ref.requests:
        names = {k.lower() for k, _ in r.headers}
        if r.upgrade and names & {b"content-length", b"transfer-encoding"}:
            return "upgrade_with_body"
        if r.upgrade and body_before:
            return "body_then_upgrade"
        body_before = body_before or bool(names & {b"content-length", b"transfer-encoding"})
    return None


# -- the run --------------------------------------------------------------------------


@dataclass
class Run:
    failures: list = field(default_factory=list)
    cases: int = 0
    mutated: int = 0
    forwarded: int = 0
    answered: int = 0
    waited: int = 0
    skipped: int = 0  # cases of a known-open class (OPEN_CLASSES)
    early: int = 0  # answers the backend sent before the request body
    continued: int = 0  # Expect: 100-continue bodies sent after lb's 100 Continue
    elapsed: float = 0.0


def fuzz(lb: LBProc, backend: FuzzBackend, seed: int, n_cases: int, budget: float,
         exclude: frozenset = OPEN_CLASSES) -> Run:
    rng = random.Random(seed)
    run = Run()
    t0 = time.monotonic()
    errors_seen = 0
    recent: dict = {}  # the last few cases, for requests that reach the backend late
    for case_id in range(n_cases):
        if time.monotonic() - t0 > budget:
            break
        case = make_case(rng, case_id, exclude)
        wait_for_lb = rng.random() < 0.05
        if ONLY and case_id not in ONLY:
            continue
        ref = reference(case.data)
        if open_class(ref) in exclude:
            run.skipped += 1
            continue
        with backend.lock:
            backend.plan.update(case.kinds)
            start = len(backend.requests)
        out = drive(lb.port, case, ref, wait_for_lb)
        bad = canary(lb.port, backend, case_id)
        with backend.lock:
            got = backend.requests[start:]
            conn_errors = [(c.id, c.error, bytes(c.data[-300:])) for c in backend.conns if c.error]
        canaries = [r for r in got if r.target.startswith(b"/canary/")]
        mine, late = [], []
        for r in got:
            if r.target.startswith(b"/canary/"):
                continue
            owner = case_of(r.target)
            sent_now = any(r.target in targets(w.target) for w in ref.requests)
            (late if owner in recent and not sent_now else mine).append(r)
        bad += check_answers(case, ref, out, mine)
        bad += check_forwarded(case, ref, mine)
        for r in late:  # forwarded for an earlier case, reached the backend after its check
            earlier_case, earlier_ref = recent[case_of(r.target)]
            if not any(same_request(r, want) for want in earlier_ref.valid_prefix):
                bad.append(f"late at the backend: {r.method!r} {r.target!r} ({len(r.body)} body bytes) is no "
                           f"request case {earlier_case.id} sent validly")
            bad += [f"late request {r.target!r}: {e}" for e in check_fields(r, earlier_ref.valid_prefix[0])
                    if earlier_ref.valid_prefix and r.complete]
        recent[case_id] = (case, ref)
        recent.pop(case_id - 8, None)
        bad += check_canary_at_backend(backend, case_id, canaries)
        for cid, err, tail in conn_errors[errors_seen:]:
            bad.append(f"the backend could not parse what lb sent on connection {cid}: {err}; last bytes {tail!r}")
        errors_seen = len(conn_errors)
        run.cases += 1
        run.mutated += bool(case.mutations)
        run.forwarded += sum(r.complete for r in mine)
        run.early += sum(r.answered for r in mine)
        run.continued += case.expect_wait and out.reader.interim > 0
        run.answered += sum(1 for a in out.reader.finals if a.header(b"x-echo") is not None)
        run.waited += wait_for_lb
        if bad:
            bad.append(f"client received {out.reader.raw[:400]!r}")
            bad.append(f"backend received {[(r.conn, r.method, r.target, r.complete, r.kind) for r in got]}")
            run.failures.append((case, ref, bad))
    run.elapsed = time.monotonic() - t0
    return run


def report(run: Run) -> str:
    lines = [f"{len(run.failures)} of {run.cases} cases failed (seed {SEED}):"]
    for case, ref, bad in run.failures[:12]:
        lines.append(case.repro())
        lines.append(f"  reference: {[(r.method, r.target, len(r.body), r.complete, r.invalid) for r in ref.requests]}"
                     f" end={ref.end} {ref.error}")
        lines += ["  - " + b for b in bad[:8]]
    return "\n".join(lines)
