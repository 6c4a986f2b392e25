"""The engine's only source of time, injected so a virtual clock can later drive the same code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class Clock:
    """Wall time on the running event loop: `now`, `sleep` and `call_later`, nothing else."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> None:
        asyncio.get_running_loop().call_later(delay, callback, *args)
