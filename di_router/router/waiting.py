"""One wait the shutdown needs twice: for requests to drain, then for settlements to end."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any


async def until_done(
    tasks: Collection[asyncio.Future[Any]], timeout: float, unless: asyncio.Event
) -> None:
    """Until every task is done, `timeout` passes, or `unless` is set (an operator's second
    signal: stop now), whichever comes first. The tasks are left running."""
    pending = {task for task in tasks if not task.done()}
    if not pending or unless.is_set():
        return
    stop = asyncio.ensure_future(unless.wait())
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while pending and not unless.is_set():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            done, _ = await asyncio.wait(
                {*pending, stop}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            pending -= done
    finally:
        stop.cancel()
