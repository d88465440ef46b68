"""The admin process: `python -m lb.admin --runtime DIR --fd N`.

The supervisor passes the validated config as msgpack on stdin and the admin
listening socket (bound and listening) as descriptor N.  The process writes
`R` on stdout once it serves, `H` every second from its loop (heartbeat),
stops gracefully on SIGTERM (exit 0), at once on SIGQUIT, and exits 3 with
one log line when it cannot boot (bad config, descriptor or endpoints).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket

import zmq

from lb.core import log
from lb.core.child import EXIT_BOOT, EXIT_OK, READY, BootError, Liveness, read_config, tell
from lb.core.config import Config

from .api import API
from .discovery import Discovery
from .health import HealthChecker
from .httpserver import Server
from .state import AdminState

POLL = 0.1  # seconds: fallback poll of the ZeroMQ sockets (their descriptors are edge-triggered)
TICK = 1.0  # seconds: history sample, control republish, heartbeat


def _listener(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise OSError(f"descriptor {fd} is not a listening TCP socket")
    return sock


async def serve(state: AdminState, sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGQUIT, lambda: os._exit(0))
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.reopen() and log.log("logs_reopened"))
    api = API(state)
    server = Server(api.router, sock, host_ok=api.host_ok)
    await server.start()
    checker = HealthChecker(state)
    checker.start()
    discovery = Discovery(state)
    discovery.start()
    state.discovery = discovery
    if state.cfg.fleet.etcd:  # (a reload cannot add or remove the fleet: that needs a restart)
        from .etcd import Member

        state.member = Member(state)
        state.member.start()
    forecasting = loop.create_task(state.capacity.run())
    fds = state.fds()
    for fd in fds:
        loop.add_reader(fd, state.poll)
    liveness = Liveness()
    addr = sock.getsockname()
    tell(READY)
    log.log("admin_ready", listen=f"{addr[0]}:{addr[1]}", runtime=state.runtime_dir)
    state.tick()
    next_tick = loop.time() + TICK
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), POLL)
        except asyncio.TimeoutError:
            pass
        state.poll()
        now = loop.time()
        if now >= next_tick:
            next_tick = max(next_tick + TICK, now + TICK / 2)
            state.tick()
            if not liveness.beat():
                log.log("admin_orphaned")
                break
    log.log("admin_stopping")
    api.stopping.set()
    forecasting.cancel()
    await checker.stop()
    await discovery.stop()
    if state.member is not None:
        await state.member.stop()
    for fd in fds:
        loop.remove_reader(fd)
    await server.close()
    state.close()
    log.log("admin_exit")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lb.admin")
    ap.add_argument("--runtime", required=True, help="runtime directory (ipc endpoints, state file)")
    ap.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    try:
        cfg: Config = read_config()
    except BootError as exc:
        log.log("admin_boot_failed", error=str(exc))
        return EXIT_BOOT
    try:
        sock = _listener(args.fd)
    except OSError as exc:
        log.log("admin_boot_failed", error=f"admin socket: {exc.strerror or exc}")
        return EXIT_BOOT
    try:
        os.makedirs(args.runtime, exist_ok=True)
        state = AdminState(cfg, args.runtime)
    except (OSError, zmq.ZMQError) as exc:
        log.log("admin_boot_failed", error=f"runtime endpoints in {args.runtime}: {exc}")
        return EXIT_BOOT
    try:
        return asyncio.run(serve(state, sock))
    except FileNotFoundError as exc:  # the dashboard file missing from an install
        log.log("admin_boot_failed", error=str(exc))
        return EXIT_BOOT
