"""How many completions run at once: a limit, a bounded queue, and a fast 429 beyond it.

Without a bound a burst of clients turns into a burst of descriptors and backend requests; with
an unbounded queue it turns into latency nobody asked for. Places are handed from a finishing
request straight to the oldest waiter, so the queue is fair and never overtaken.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Overloaded(Exception):
    """No place now and none soon: answer 429 with Retry-After."""


class Admission:
    def __init__(self, limit: int, queue_limit: int, queue_timeout: float) -> None:
        self._limit = limit
        self._queue_limit = queue_limit
        self._timeout = queue_timeout
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def enter(self) -> None:
        if not self._limit:
            return
        if self._active < self._limit and not self._waiters:
            self._active += 1
            return
        if len(self._waiters) >= self._queue_limit:
            raise Overloaded
        place = asyncio.get_running_loop().create_future()
        self._waiters.append(place)
        try:
            async with asyncio.timeout(self._timeout):
                await place  # set by `leave`, which passes its place on
        except BaseException as exc:
            if place.done() and not place.cancelled():
                self.leave()  # the place was handed over just as this waiter gave up
            if place in self._waiters:
                self._waiters.remove(place)
            if isinstance(exc, TimeoutError):
                raise Overloaded from None
            raise

    def leave(self) -> None:
        if not self._limit:
            return
        while self._waiters:
            place = self._waiters.popleft()
            if not place.done():
                place.set_result(None)
                return
        self._active -= 1
