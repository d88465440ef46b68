"""Continuous learning: refit in a child process, swap only a better model.

The inference process keeps the most recent joined trace records
(`Retrainer.add`).  Every `learning.retrain_interval` seconds, if no refit is
running and enough records arrived since the last one, it writes them to the
runtime directory and starts

    python -m inference.retrain --input RECORDS.npz --live LIVE.onnx --output NEW.onnx --seed N

at a lower CPU priority.  The child fits a challenger on the older 80% of the
records, scores the challenger and the live model on the most recent 20%
(`inference.train.evaluate_challenger`); a challenger that predicts better
is then judged by the routing it would give: the same 20% describe the
fleet, and a simulated copy of it is routed by `ml` with each model
(inference/twin.py); it must not route worse.  The child prints one JSON
line.  The parent polls the child from its loop (never waits for it) and hot-swaps the
model only when the child says the challenger is better.  A separate process
keeps the tick loop free of the GIL while scikit-learn fits.

A model from elsewhere (the fleet's leader, lb/admin/modelshare.py) is
judged the same way by the same child, without the fit
(`--candidate MODEL.onnx`, `Retrainer.judge`): predicted better on this
instance's held-out records, then routing no worse in its twin.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from inference.model import Model, ModelError
from lb.core.boot import python_argv

MIN_RECORDS = 500  # records before a refit is attempted
MAX_RECORDS = 50_000  # most recent records kept for refits
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # the refit's BLAS: one thread


class Retrainer:
    def __init__(self, runtime_dir: str, interval: float, *, seed: int = 0, max_iter: int = 200,
                 sample: float = 0.0, model_errors: str = "earned") -> None:
        self.dir = runtime_dir
        self.sample = sample  # learning.trace_sample: the records' share of the requests (the twin's rate)
        self.model_errors = model_errors  # learning.model_errors: how the twin's pick prices the model's errors
        self.interval = interval
        self.seed = seed
        self.max_iter = max_iter
        self.chunks: list[dict[str, np.ndarray]] = []
        self.n = 0
        self.new_since_fit = 0
        self.next_run = time.monotonic() + interval
        self.child: subprocess.Popen | None = None
        self.child_out = ""
        self.round = 0
        # (Model, member) from elsewhere the running child judges (None: a refit); the
        # model's file is a copy this judgement owns: removed unless adopted
        self.judging: tuple[Model, str] | None = None

    def add(self, records: dict[str, np.ndarray]) -> None:
        self.chunks.append(records)
        k = len(records["latency"])
        self.n += k
        self.new_since_fit += k
        while self.n - len(self.chunks[0]["latency"]) >= MAX_RECORDS:
            self.n -= len(self.chunks.pop(0)["latency"])

    def poll(self, live: Model | None, may_start: bool = True) -> tuple[str, dict, Model | None] | None:
        """Advance: start a refit when due (and `may_start`: a fleet member that
        does not lead adopts the leader's models instead), collect a finished one.

        Returns None, or (event, fields, new model or None) when a refit ended."""
        if self.child is not None:
            if self.child.poll() is None:
                return None
            return self._collect(live)
        if (not may_start or time.monotonic() < self.next_run or self.new_since_fit < MIN_RECORDS // 5
                or self.n < MIN_RECORDS):
            return None
        self._start(live)
        return None

    def _start(self, live: Model | None) -> None:
        self.round += 1
        self.next_run = time.monotonic() + self.interval
        self.new_since_fit = 0
        self.out = os.path.join(self.dir, f"model-{os.getpid()}-{self.round}.onnx")
        self._spawn(live, ["--output", self.out, "--max-iter", str(self.max_iter)])

    def idle(self) -> bool:
        """No child runs (a refit or a judgement)."""
        return self.child is None

    def judge(self, live: Model | None, candidate: Model, member: str) -> None:
        """Start judging a model from elsewhere (fleet member `member`, its
        leader) on this instance's records, as a refit is judged; `poll` says
        the verdict (`model_adopted` with the candidate, or `model_declined`,
        its file removed as a refit's that is not swapped in).  Only when
        `idle()`."""
        self.judging = (candidate, member)
        self._spawn(live, ["--candidate", candidate.path])

    def _spawn(self, live: Model | None, args: list[str]) -> None:
        from inference.traces import concat, write

        data = concat(self.chunks)
        order = np.argsort(data["ts"], kind="stable")
        data = {k: v[order] for k, v in data.items()}
        inp = write(self.dir, data, name="retrain-input.npz")
        # lb's own packages, never the current directory's (lb/core/boot.py)
        cmd = [*python_argv("inference.retrain"), "--input", inp, *args,
               "--seed", str(self.seed), "--sample", str(self.sample), "--model-errors", self.model_errors]
        if live is not None:
            cmd += ["--live", live.path]
        # One thread: BLAS would otherwise start one per core, and its threads
        # spin while they wait, taking CPU from the workers beside it.
        env = {**os.environ, **{k: "1" for k in THREAD_VARS}}
        self.child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=env, preexec_fn=lambda: os.nice(10))

    def _collect(self, live: Model | None) -> tuple[str, dict, Model | None]:
        child, self.child = self.child, None
        judging, self.judging = self.judging, None
        out, err = child.communicate()
        try:
            result = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            msg = err.decode(errors="replace").strip().splitlines()
            fields = {"error": msg[-1][:300] if msg else f"exit code {child.returncode}"}
            if judging is not None:
                return self._declined(judging, fields)
            return "retrain_failed", fields, None
        fields = {"live_score": result.get("live"), "challenger_score": result.get("challenger"),
                  "records": result.get("records"), "cpu_s": result.get("cpu_s"),
                  "previous": live.version if live is not None else ""}
        fields.update({k: v for k, v in result.items() if k.startswith("twin")})
        if judging is not None:
            if not result.get("swap"):
                return self._declined(judging, fields)
            model, fields["member"] = judging
            fields["version"] = model.version
            return "model_adopted", fields, model
        if not result.get("swap"):
            discard(self.out)
            return "model_kept", fields, None
        try:
            model = Model.load(self.out)
        except ModelError as exc:
            return "retrain_failed", {"error": str(exc)}, None
        fields["version"] = model.version
        return "model_swapped", fields, model

    def ready_to_check(self) -> bool:
        return self.n >= MIN_RECORDS

    @staticmethod
    def _declined(judging: tuple[Model, str], fields: dict) -> tuple[str, dict, None]:
        model, member = judging
        discard(model.path)
        return "model_declined", {**fields, "version": model.version, "member": member}, None

    def stop(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait()
        if self.judging is not None:
            discard(self.judging[0].path)
            self.judging = None


def discard(path: str) -> None:
    """Remove a model file this process made, if it is still there."""
    try:
        os.unlink(path)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    from inference.train import TrainError, evaluate_challenger, fit, score, split_recent
    from inference.traces import TraceError, read

    ap = argparse.ArgumentParser(prog="python -m inference.retrain")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", default="", help="where a refit that wins is written")
    ap.add_argument("--candidate", default="",
                    help="judge this model (from elsewhere) against --live instead of fitting one")
    ap.add_argument("--live", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--sample", type=float, default=0.0,
                    help="share of the requests the records were sampled from (0: no routing check)")
    ap.add_argument("--model-errors", default="earned", choices=("earned", "always"))
    args = ap.parse_args(argv)
    if bool(args.output) == bool(args.candidate):
        ap.error("give one of --output (fit a model) and --candidate (judge one)")
    try:
        data = read([args.input])
        older, heldout = split_recent(data)
        if args.candidate:
            blob = None
            challenger = Model.load(args.candidate)
        else:
            blob = fit(older, seed=args.seed, max_iter=args.max_iter)
            challenger = Model.from_bytes(blob, args.output)
        live = Model.load(args.live) if args.live else None
    except (TraceError, TrainError, ModelError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    swap = evaluate_challenger(live, challenger, heldout)
    twin_fields: dict = {}
    if swap and live is not None and args.sample > 0:
        from inference import twin

        try:
            verdict = twin.judge(live, challenger, twin.describe(heldout, args.sample), seed=args.seed,
                                 learning={"model_errors": args.model_errors})
        except twin.TwinError as exc:
            swap = False  # a refit nothing could route is not adopted on its loss alone
            twin_fields = {"twin_error": str(exc)}
        else:
            swap = verdict.passed
            twin_fields = verdict.fields()
    if swap and blob is not None:
        tmp = args.output + ".tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, args.output)
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "swap": swap, "records": len(data["latency"]), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
        "live": round(score(live, heldout), 4) if live is not None else None,
        "challenger": round(score(challenger, heldout), 4), **twin_fields,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
