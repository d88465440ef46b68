"""The admin process's background tasks (health checks, DNS discovery): one
task per name, restarted as a set when what they depend on changes."""

from __future__ import annotations

import asyncio


async def cancel(tasks: list[asyncio.Task | None]) -> None:
    """Cancel every task given (None: not started) and wait until all have ended."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    await asyncio.gather(*live, return_exceptions=True)


class TaskSet:
    """One task per name (`tasks`), all restarted whenever `wanted()`'s
    signature changes; checked every WATCH_EVERY seconds by one watcher task.
    Subclasses give `wanted() -> (signature, what restart needs)` and
    `restart(what)`, which starts the new tasks."""

    WATCH_EVERY = 1.0

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task] = {}
        self.signature = None
        self.watcher: asyncio.Task | None = None

    def start(self) -> None:
        self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        await cancel([*self.tasks.values(), self.watcher])
        self.tasks.clear()

    def wanted(self) -> tuple[object, object]:  # pragma: no cover - abstract
        raise NotImplementedError

    def restart(self, what) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def _watch(self) -> None:
        while True:
            sig, what = self.wanted()
            if sig != self.signature:
                self.signature = sig
                for t in self.tasks.values():
                    t.cancel()
                self.tasks.clear()
                self.restart(what)
            await asyncio.sleep(self.WATCH_EVERY)
