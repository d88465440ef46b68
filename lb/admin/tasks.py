"""Stopping the admin process's background tasks (health checks, DNS discovery)."""

from __future__ import annotations

import asyncio


async def cancel(tasks: list[asyncio.Task | None]) -> None:
    """Cancel every task given (None: not started) and wait until all have ended."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    await asyncio.gather(*live, return_exceptions=True)
