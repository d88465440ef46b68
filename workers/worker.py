"""A worker process: one uvloop event loop serving its SO_REUSEPORT listeners.

Started by the supervisor as `python -m workers --fd N --slot I` (and
`--tls-fd M` with an HTTPS listener), with the validated config (msgpack) on
stdin.  Exit codes tell the supervisor what
happened: 0 clean stop, 3 could not boot (bad socket or config).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import random
import signal
import socket

import uvloop

from lb.core import config as cfgmod
from lb.core.child import DRAINING, EXIT_BOOT, EXIT_OK, READY, Liveness, read_config, tell
from lb.core.log import Throttle, log, reopen
from workers import fastpath
from workers.accesslog import AccessLog
from workers.backend import Backend
from workers.strategies import make_strategy
from workers.classes import make_classifier
from workers.dispatch import Dispatcher
from workers.health import NEVER, HealthState
from workers import fleet
from workers.downstream import Downstream
from workers.edge import RedirectDownstream, TLSAccept, TLSDownstream
from workers.http import DATE
from workers.listener import Listener, connection_cap
from workers.pool import Pool
from workers.proxyproto import LOG_EVERY as PROXY_LOG_EVERY, ProxyHeader
from workers.ratelimit import RateLimiter
from workers.request_head import HEAD_SLACK
from workers.telemetry import Telemetry
from workers.timers import CLOCK, SWEEP_INTERVAL
from workers.upstream import UpstreamConnection

FLEET_WAIT = 2.0  # seconds a starting worker waits for the fleet when backends come from DNS


class Worker:
    def __init__(self, cfg: cfgmod.Config, slot: int = 0, *, runtime_dir: str | None = None,
                 generation: int = 0) -> None:
        self.cfg = cfg
        self.slot = slot
        self.runtime_dir = runtime_dir
        self.generation = generation
        self.telemetry: Telemetry | None = None
        t = cfg.timeouts
        lim = cfg.limits
        self.t_client_header = t.client_header
        self.t_client_body = t.client_body
        self.t_keepalive = t.keepalive
        self.t_send = t.send
        self.t_tunnel_idle = t.tunnel_idle
        self.t_upstream_connect = t.upstream_connect
        self.t_upstream_response = t.upstream_response
        self.t_drain = t.drain
        self.max_request_line = lim.max_request_line
        self.max_header_size = lim.max_header_size
        self.max_headers = lim.max_headers
        self.max_header_fields = 4 * lim.max_headers  # list slots: name, sep, value, CRLF
        self.max_body_size = lim.max_body_size
        self.max_head_bytes = lim.max_request_line + lim.max_header_size
        self.max_response_head = lim.max_response_head
        self.retries = cfg.upstream.retries
        self.retry_connect_non_idempotent = cfg.upstream.retry_connect_non_idempotent
        self.listen_host = cfg.listen.encode()  # Host for HTTP/1.0 requests that have none
        self.request_id = cfg.upstream.request_id
        # X-Request-Id: a per-process random prefix and a counter (unique, cheap).
        # `new_request_id()` formats the next count after the prefix; built from
        # C callables only (map over itertools.count), so a call runs no Python code.
        self.rid_prefix = b"%08x%02x-" % (random.getrandbits(32), slot % 256)
        self.new_request_id = map((self.rid_prefix + b"%x").__mod__, itertools.count(1)).__next__
        # The C fast path for the common request head (None: httptools only).
        self.scan_request = fastpath.RequestScanner(
            lim.max_request_line, lim.max_header_size + HEAD_SLACK, lim.max_headers,
            self.new_request_id if self.request_id else None, self.max_body_size,
        ).scan if fastpath.AVAILABLE else None
        self.scan_response = fastpath.scan_response  # ... and for the common response head
        al = cfg.access_log
        self.access_log = AccessLog(al.path, al.sample, al.buffer, slot) if al.path else None
        self.dispatcher = Dispatcher(self)  # sends exchanges upstream (workers/dispatch.py)
        self.conns: set[Downstream] = set()
        # Transports accepted whose Downstream does not exist yet: in the TLS
        # handshake (workers/edge.py) or before their PROXY header.
        self.pending: set = set()
        self.draining = False
        # counters
        self.accepted = 0
        self.requests = 0
        self.rejected = 0
        self.timeouts = 0
        self.no_backend = 0
        self.shed = 0  # 503: in-flight cap or every circuit breaker open
        self.limited = 0  # 429: per-client rate limit
        self.abandoned = 0  # requests whose client went away while waiting for the backend's answer
        self.proxy_errors = 0  # connections closed for a missing or bad PROXY protocol header
        self.proxy_error_log = Throttle(PROXY_LOG_EVERY)  # proxy_protocol_error lines
        self.active = 0  # requests bound to a backend (in flight upstream)
        prot = cfg.protection
        n = max(1, cfg.workers)

        def share(limit: int) -> int:  # this worker's even share of an instance-wide limit
            return -(-limit // n) if limit else NEVER

        self.max_active = share(prot.max_inflight)
        self.limiter = RateLimiter(prot.rate_limit, prot.rate_burst) if prot.rate_limit else None
        DATE.retry_after = b"Retry-After: %d\r\n" % prot.retry_after
        self.loop: asyncio.AbstractEventLoop | None = None
        self.max_connections = connection_cap(lim.max_connections, len(cfg.backends),
                                              cfg.upstream.keepalive)
        self.listener = Listener(self, cfg.backlog, self.max_connections)
        n_classes = len(cfg.class_names)
        self.classify = make_classifier(cfg.classes)
        # one flag for the request path: is there anything to check per request?
        self.request_checks = self.classify is not None or self.limiter is not None
        # The config's backends to start with; the admin's fleet (discovered and
        # added backends too) replaces them in place when it comes (workers/fleet.py).
        static = cfg.static_backends()
        self.backends = [Backend(b, n_classes, i) for i, b in enumerate(static)]
        self.backend_specs = {b.name: fleet.spec(b) for b in static}
        self.backend_max_conns = share(prot.backend_max_connections)
        self.backend_max_pending = share(prot.backend_max_pending)
        for b in self.backends:
            b.max_conns = self.backend_max_conns
            b.max_pending = self.backend_max_pending
        self.strategy = self.make_strategy(cfg.strategy)
        self.rng = random.Random(cfg.balancer.seed + slot if cfg.balancer.seed else None).random
        self.health = HealthState(self)
        self._tls_setup(cfg)
        self._stopped: asyncio.Future | None = None
        self._aborted = False  # stop_now: stop without waiting for connections
        self.liveness = Liveness()

    def _tls_setup(self, cfg: cfgmod.Config) -> None:
        """The HTTPS listener's context (certificates, SNI, shared ticket keys)
        and the backends' client context; lb.tls is imported only when used."""
        self.tls_ctx = self.upstream_tls = None
        self.redirect_port = b""  # ":8443" in redirects to https, "" for port 443
        if cfg.tls.listen:
            from lb.core import tickets, tls

            keys = tickets.TicketKeys.from_env(cfg.tls.ticket_rotation) if cfg.tls.session_tickets else None
            self.tls_ctx = tls.server_context(cfg, keys)
            port = cfg.tls.redirect_port or int(cfg.tls.listen.rpartition(":")[2])
            self.redirect_port = b"" if port == 443 else b":%d" % port
        if any(b.tls for b in cfg.backends):
            from lb.core import tls

            self.upstream_tls = tls.client_context(cfg)

    def _pool_tls(self, bcfg) -> dict | None:
        if not bcfg.tls:
            return None
        if self.upstream_tls is None:  # the first TLS backend came with the fleet
            from lb.core import tls

            self.upstream_tls = tls.client_context(self.cfg)
        host = bcfg.address.rpartition(":")[0].strip("[]")
        return {"ssl": self.upstream_tls, "server_hostname": bcfg.sni or host,
                "ssl_handshake_timeout": self.t_upstream_connect}

    def make_pool(self, backend: Backend, bcfg) -> Pool:
        return Pool(backend, self.loop, self._upstream_factory(backend),
                    max_idle=self.cfg.upstream.keepalive, idle_timeout=self.cfg.timeouts.upstream_idle,
                    tls=self._pool_tls(bcfg))

    def make_strategy(self, name: str):
        cfg = self.cfg
        return make_strategy(
            name, self.backends, decay=cfg.balancer.ewma_decay,
            seed=(cfg.balancer.seed + self.slot) if cfg.balancer.seed else 0,
            class_names=cfg.class_names, guard_share=cfg.learning.guard_share,
            exploration=cfg.learning.exploration, probe_share=cfg.capacity.explore,
            deadline=cfg.timeouts.upstream_response,
        )

    def rebuild_strategy(self) -> None:
        """Over a changed fleet: the same strategy, the table in hand installed again."""
        old = self.strategy
        strategy = self.make_strategy(old.name)
        if hasattr(old, "patience") and hasattr(strategy, "patience"):
            strategy.patience = old.patience  # the clients are the same (and the classes: a reload
            strategy.lost_after = old.lost_after  # that changes them makes new workers)
            strategy.refresh()  # (a failure's cost follows the patience)
        if self.telemetry is not None:
            self.telemetry.steer.install_table(strategy)
        self.strategy = strategy

    # -- lifecycle ------------------------------------------------------------

    async def serve(self, sock: socket.socket, tls_sock: socket.socket | None = None) -> None:
        loop = self.loop = asyncio.get_running_loop()
        for b, bcfg in zip(self.backends, self.cfg.static_backends()):
            b.pool = self.make_pool(b, bcfg)
        if self.runtime_dir:
            self.telemetry = Telemetry(self, self.runtime_dir, self.generation)
            self.telemetry.start(loop)
            cfg = self.cfg
            if cfg.discovers and (any(b.dynamic for b in cfg.backends)
                                  or os.path.exists(cfg.fleet_file(self.runtime_dir))):
                # Backends given by name, or added at run time, come with the
                # admin's fleet: wait for it (briefly) before accepting, rather
                # than answer 503 for want of them or load the others.
                await self.telemetry.fleet_ready(FLEET_WAIT)
        # Everything allocated so far lives as long as the worker: keep it out of
        # the collector's scans, and collect young objects less often (requests
        # free their objects by reference counting; only rare cycles need the GC).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20000, 50, 100)
        await self._serve_listeners(sock, tls_sock)
        self._stopped = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, self.drain)
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor decides
        loop.add_signal_handler(signal.SIGQUIT, self.stop_now)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        loop.call_later(SWEEP_INTERVAL, self._sweep)
        tell(READY)  # first, as we accept now
        log("worker_ready", slot=self.slot, pid=os.getpid(), strategy=self.strategy.name,
            fastpath=self.scan_request is not None, max_connections=self.max_connections)
        while True:
            await self._stopped
            # A connection accepted just before the listener closed has its
            # connection_made queued behind the drain (uvloop schedules it with
            # call_soon): let the queue run, and stay for it if one came in.
            await asyncio.sleep(0)
            if self._aborted or (not self.conns and not self.pending):
                break
            self._stopped = loop.create_future()
        if self.telemetry is not None:
            self.telemetry.close()
        if self.access_log is not None:
            self.access_log.close()

    async def _serve_listeners(self, sock: socket.socket, tls_sock: socket.socket | None) -> None:
        """The plain listener, and the HTTPS one when configured; with the PROXY
        protocol on a listener, its connections start with workers/proxyproto.py."""
        cfg = self.cfg
        plain = RedirectDownstream if cfg.tls.redirect_http else Downstream
        if cfg.proxy_protocol:
            await self.listener.serve(sock, lambda: ProxyHeader(self, lambda: plain(self)))
        else:
            await self.listener.serve(sock, lambda: plain(self))
        if tls_sock is None or self.tls_ctx is None:
            return
        if cfg.tls.proxy_protocol:  # the header comes before the handshake: TLS starts after it
            tls = (self.tls_ctx, cfg.tls.handshake_timeout)
            await self.listener.serve(tls_sock, lambda: ProxyHeader(self, lambda: TLSDownstream(self), tls))
        else:
            await self.listener.serve(tls_sock, lambda: TLSAccept(self))

    def handshake_over(self, transport, fut) -> None:
        """A TLS handshake ended (workers/edge.py): done, failed or cut."""
        if not fut.cancelled():
            fut.exception()  # a failure is counted by lb/core/tls.py, not logged as unretrieved
        self.pending_gone(transport)

    def pending_gone(self, transport) -> None:
        self.pending.discard(transport)
        if self.listener.paused:
            self.listener.maybe_resume()
        if self.draining:
            self._maybe_stopped()

    def reopen_logs(self) -> None:
        if reopen():
            log("logs_reopened", slot=self.slot)
        if self.access_log is not None:
            self.access_log.reopen()

    def _upstream_factory(self, backend):
        def factory():
            return UpstreamConnection(backend, self)
        return factory

    def drain(self) -> None:
        """Stop accepting, finish in-flight requests, close idle connections."""
        if self.draining:
            self.stop_now()
            return
        self.draining = True
        log("worker_draining", slot=self.slot, pid=os.getpid(), connections=len(self.conns))
        self.listener.close()
        tell(DRAINING)
        for c in list(self.conns):
            c.drain()
        self.loop.call_later(self.t_drain, self.stop_now)
        self._maybe_stopped()

    def stop_now(self) -> None:
        self._aborted = True
        for c in list(self.conns):
            c.transport.abort()
        for t in list(self.pending):
            t.abort()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _maybe_stopped(self) -> None:
        if self.draining and not self.conns and not self.pending and not self._stopped.done():
            self._stopped.set_result(None)

    def _sweep(self) -> None:
        now = CLOCK.tick()
        DATE.tick()
        t_connect = self.t_upstream_connect
        t_response = self.t_upstream_response
        for c in list(self.conns):
            if c.deadline < now or c.send_deadline < now:
                c.on_deadline(now)
            if c.gate.reasons and c.gate.peer_gone():
                # The client left while its connection was paused (pipeline full,
                # upstream busy, upgrade pending): the end of file a read would
                # have seen.  Queued requests and unparsed bytes go with it.
                c.transport.close()
                continue
            ex = c.ex
            if ex is not None and ex.upstream_deadline(t_connect, t_response) < now:
                self.dispatcher.timeout(ex)
        for b in self.backends:
            b.pool.expire(now)
        if self.listener.paused:
            self.listener.maybe_resume()  # (a resume that failed for want of a descriptor)
        self.health.sweep(now)
        if self.access_log is not None:
            self.access_log.flush()
        if self.limiter is not None:
            self.limiter.sweep(now)
        alive = self.liveness.beat(now)  # a heartbeat: this loop is alive
        if self.draining:
            self._maybe_stopped()
        elif not alive:
            log("worker_orphaned", slot=self.slot, pid=os.getpid())
            self.drain()
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="workers")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--slot", type=int, default=0)
    ap.add_argument("--runtime", help="runtime directory (ipc sockets to the other processes)")
    ap.add_argument("--generation", type=int, default=0)
    ap.add_argument("--tls-fd", type=int, default=-1, help="the HTTPS listener's socket")
    args = ap.parse_args(argv)
    try:
        os.set_blocking(1, False)  # a full pipe only delays the news (lb/core/child.py tell)
        cfg = read_config()
        sock = socket.socket(fileno=args.fd)
        tls_sock = socket.socket(fileno=args.tls_fd) if args.tls_fd >= 0 else None
    except Exception as exc:  # noqa: BLE001 - reported to the supervisor by exit code
        log("worker_boot_failed", slot=args.slot, error=str(exc))
        return EXIT_BOOT
    try:
        worker = Worker(cfg, args.slot, runtime_dir=args.runtime, generation=args.generation)
    except cfgmod.ConfigError as exc:  # a certificate changed since the supervisor read it
        log("worker_boot_failed", slot=args.slot, error=str(exc))
        return EXIT_BOOT
    except OSError as exc:  # e.g. the access log cannot be opened, a certificate is unreadable
        where = f"{exc.filename}: " if exc.filename else ""
        log("worker_boot_failed", slot=args.slot, error=f"{where}{exc.strerror or exc}")
        return EXIT_BOOT
    uvloop.run(worker.serve(sock, tls_sock))
    log("worker_exit", slot=args.slot, pid=os.getpid())
    return EXIT_OK
