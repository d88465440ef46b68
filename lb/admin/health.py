"""Active HTTP health checks, run once for the whole instance.

One asyncio task per backend sends `GET <health.path>` every `interval` on a
fresh connection (so the check sees what a new client connection would; over
TLS for `tls = true` backends, verified as the workers verify them) and
reads the status line within `timeout`.  A backend goes down after `fall`
failed checks in a row and comes back after `rise` passed ones; it starts up.
The result is the `down` list of the control state (lb/admin/control.py),
published at once on every change: every worker and the inference process
receive it within milliseconds, and workers stop routing to a down backend
(then ramp it up again through slow start when it comes back).
"""

from __future__ import annotations

import asyncio
import ssl

from lb.core import log

from .tasks import TaskSet

MAX_HEAD = 8192


class HealthChecker(TaskSet):
    """One active check task per backend of the fleet; restarted as a set when
    the config or the fleet changes."""

    def __init__(self, state) -> None:
        super().__init__()
        self.state = state  # AdminState: .cfg, .control
        self.down: set[str] = set()

    def wanted(self):
        cfg = self.state.cfg
        fleet = self.state.fleet.backends()  # the config's, the discovered and the added ones
        sig = (cfg.health, cfg.upstream, tuple((b.name, b.address, b.tls, b.sni) for b in fleet))
        return sig, (cfg, fleet)

    def restart(self, what) -> None:
        cfg, fleet = what
        names = {b.name for b in fleet} if cfg.health.path else set()
        stale = self.down - names
        if stale:
            self.down -= stale
            self._publish()
        if not cfg.health.path:
            return
        loop = asyncio.get_running_loop()
        tls_ctx = None
        if any(b.tls for b in fleet):
            from lb.core.tls import client_context

            try:
                tls_ctx = client_context(cfg)  # as the workers speak to them
            except Exception as exc:  # noqa: BLE001
                # (files changed since the config was checked): TLS backends go
                # unchecked until the next config; the others are still checked
                log.log("health_tls_unavailable", error=str(exc) or type(exc).__name__)
        for b in fleet:
            if b.tls and tls_ctx is None:
                continue
            self.tasks[b.name] = loop.create_task(self._check_loop(b, cfg.health, tls_ctx))

    async def _check_loop(self, backend, hc, tls_ctx) -> None:
        host, _, port = backend.address.rpartition(":")
        host = host.strip("[]")
        tls = {"ssl": tls_ctx, "server_hostname": backend.sni or host} if backend.tls else {}
        request = (f"GET {hc.path} HTTP/1.1\r\nHost: {hc.host or backend.address}\r\n"
                   f"User-Agent: lb-health-check\r\nConnection: close\r\n\r\n").encode()
        passes = fails = 0
        while True:
            ok, detail = await self._check(host, int(port), request, hc, tls)
            if ok:
                passes, fails = passes + 1, 0
                if backend.name in self.down and passes >= hc.rise:
                    self.down.discard(backend.name)
                    log.log("health_change", backend=backend.name, up=True, checks=passes)
                    self._publish()
            else:
                passes, fails = 0, fails + 1
                if backend.name not in self.down and fails >= hc.fall:
                    self.down.add(backend.name)
                    log.log("health_change", backend=backend.name, up=False, checks=fails,
                            reason=detail)
                    self._publish()
            await asyncio.sleep(hc.interval)

    async def _check(self, host: str, port: int, request: bytes, hc, tls: dict) -> tuple[bool, str]:
        writer = None
        try:
            async with asyncio.timeout(hc.timeout):
                reader, writer = await asyncio.open_connection(host, port, **tls)
                writer.write(request)
                line = await reader.readuntil(b"\r\n")
        except TimeoutError:
            return False, "timeout"
        except ssl.SSLError as exc:
            from lb.core.tls import describe

            return False, describe(exc)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            return False, type(exc).__name__
        finally:
            if writer is not None:
                writer.transport.abort()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            return False, "not an HTTP response"
        status = int(parts[1])
        if hc.expect_status:
            good = status in hc.expect_status
        else:
            good = 200 <= status < 400
        return good, f"status {status}"

    def _publish(self) -> None:
        self.state.control.set_down(sorted(self.down))
