"""Command line: `lb run`, `lb check`, `lb capacity`, `lb demo`.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad configuration.
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from lb import __version__
from lb.core import config as cfgmod


def _error(msg: str, code: int) -> int:
    print(f"lb: {msg}", file=sys.stderr)
    return code


def _load(path: str):
    """The config, its files checked (paths lb writes, certificates it reads);
    returns it and the TLS certificates found."""
    from lb.core import tls

    cfg = cfgmod.load(path)
    cfgmod.check_paths(cfg, path)
    return cfg, tls.check(cfg, path)


def cmd_check(args) -> int:
    import time

    from lb.core.tls import EXPIRY_WARN

    try:
        cfg, certs = _load(args.config)
    except cfgmod.ConfigError as exc:
        return _error(str(exc), 2)
    for c in certs:
        left = c.expires_in()
        if left < EXPIRY_WARN:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(c.not_after))
            print(f"lb: warning: {c.path}: expires in {left / 86400:.1f} days ({when})", file=sys.stderr)
    tls = f", tls {cfg.tls.listen} ({len(cfg.tls.certificates)} certificates)" if cfg.tls.listen else ""
    print(f"{args.config}: ok ({len(cfg.backends)} backends, strategy {cfg.strategy}, listen {cfg.listen}{tls})")
    return 0


def cmd_run(args) -> int:
    from lb.supervisor.sockets import ListenError
    from lb.supervisor import Supervisor, SupervisorError

    try:
        cfg, _certs = _load(args.config)
    except cfgmod.ConfigError as exc:
        return _error(str(exc), 2)
    if args.workers is not None and not 1 <= args.workers <= 256:
        return _error("-w/--workers: must be between 1 and 256", 2)
    if args.log_file:
        import os

        from lb.core.log import LOG_FILE_ENV, reopen

        path = os.path.abspath(args.log_file)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
        except OSError as exc:
            return _error(f"--log-file {args.log_file}: {exc.strerror or exc}", 2)
        os.environ[LOG_FILE_ENV] = path
        reopen()
    try:
        return Supervisor(cfg, args.config, args.workers).run()
    except (SupervisorError, ListenError) as exc:
        return _error(str(exc), 1)


def cmd_capacity(args) -> int:
    """Ask the running instance's admin API (the config's admin.listen) for
    GET /api/capacity and print it; --json prints it as received."""
    import http.client
    import json

    try:
        cfg = cfgmod.load(args.config)
    except cfgmod.ConfigError as exc:
        return _error(str(exc), 2)
    if not cfg.admin.enabled:
        return _error(f"{args.config}: admin.enabled is false: no API to ask", 2)
    host, _, port = cfg.admin.listen.rpartition(":")
    try:
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
        conn.request("GET", "/api/capacity")
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        return _error(f"cannot reach lb's admin API at {cfg.admin.listen}: {exc.strerror or exc}", 1)
    if resp.status != 200:
        return _error(f"admin API answered {resp.status}: {body[:200]!r}", 1)
    view = json.loads(body)
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    print(format_capacity(view))
    return 0


def format_capacity(view: dict) -> str:
    f = view["fleet"]

    def num(x, fmt="{:,.1f}"):
        return "-" if x is None else fmt.format(x)

    lines = [f"load {num(f['load_rps'])} req/s, capacity {num(f['capacity_rps'])} req/s at p99 <= "
             f"{f['slo_p99_ms']:g} ms, headroom {num(f['headroom'], '{:.0%}')}, "
             f"{f['routable_backends']} routable backends, recommended {num(f['recommended_backends'], '{}')}"
             + ("" if f["known"] in (True, None) else " (a lower bound: some backends not seen under load"
                + ("" if f.get("explore") else "; capacity.explore = 0.01 would measure them") + ")")]
    if view["backends"]:
        lines.append(f"{'backend':<24} {'capacity':>10} {'saturation':>11} {'slots':>6} {'service':>9}  known")
        for name, b in view["backends"].items():
            lines.append(f"{name:<24} {b['capacity_rps']:>10,.1f} {b['saturation_rps']:>11,.1f} {b['slots']:>6.2f} "
                         f"{b['service_ms']:>7.1f}ms  {'yes' if b['known'] else 'no: ' + b['note']}")
    if view["forecast"]:
        lines.append(f"forecast ({view['forecast_method']}, {view['history_minutes']} minutes of history): "
                     + ", ".join(f"+{p['minutes']} min {p['rps']:,.1f} [{p['low']:,.1f}-{p['high']:,.1f}]"
                                 for p in view["forecast"]))
    else:
        lines.append(f"forecast: none ({view['forecast_reason']})")
    return "\n".join(lines)


def cmd_demo(args) -> int:
    from lb.demo import run_demo

    args.duration_given = args.duration is not None
    if args.duration is None:
        args.duration = 30.0
    if args.duration <= 0 or args.rate <= 0:
        return _error("demo: --duration and --rate must be > 0", 2)

    return run_demo(args)


def cmd_train(args) -> int:
    from inference.train import cmd_train as train

    return train(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lb", description="A self-optimizing HTTP load balancer.")
    ap.add_argument("--version", action="version", version=f"lb {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the load balancer in the foreground")
    run.add_argument("-c", "--config", required=True, help="TOML config file")
    run.add_argument("-w", "--workers", type=int, help="worker processes (default: config 'workers')")
    run.add_argument("--log-file", help="append logs here instead of stderr; SIGUSR1 reopens it (rotation)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=cmd_check)

    cap = sub.add_parser("capacity", help="capacity, load, forecast and advice of a running instance")
    cap.add_argument("-c", "--config", required=True, help="the running instance's config (its admin.listen)")
    cap.add_argument("--json", action="store_true", help="print the API's JSON")
    cap.set_defaults(func=cmd_capacity)

    demo = sub.add_parser("demo", help="run lb in front of simulated backends with built-in load")
    demo.add_argument("--duration", type=float, default=None,
                      help="seconds (default 30; with --compare: per strategy, default 12)")
    demo.add_argument("--rate", type=float, default=300.0, help="requests per second (default 300)")
    demo.add_argument("--strategy", default="ml", choices=cfgmod.STRATEGIES)
    demo.add_argument("--port", type=int, default=8080, help="lb listen port (default 8080)")
    demo.add_argument("--admin-port", type=int, default=9900,
                      help="admin/dashboard port (default 9900, or a free one if taken)")
    demo.add_argument("--compare", action="store_true",
                      help="run the same seeded scenario under every strategy, print one table")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="fit a routing model on captured traces, export it to ONNX")
    train.add_argument("paths", nargs="+", metavar="PATH", help="trace files (.npz) or directories of them")
    train.add_argument("-o", "--output", required=True, help="model file to write (.onnx)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0): same traces + seed, same model")
    train.add_argument("--max-iter", type=int, default=200, help="training epochs at most (default 200)")
    train.set_defaults(func=cmd_train)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
