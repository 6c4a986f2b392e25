"""How many completions run at once: a limit, a bounded queue, and a fast 429 beyond it.

Without a bound a burst of clients turns into a burst of descriptors and backend requests; with
an unbounded queue it turns into latency nobody asked for. Places are handed from a finishing
request straight to the oldest waiter, so the queue is fair and never overtaken.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

PER_REQUEST = 3
"""Descriptors an admitted request holds: the client's socket and one to each server."""
RESERVE = 32
"""Descriptors kept for the listener, health probes, etcd, log files and the loop itself."""


@dataclass(frozen=True)
class DescriptorBudget:
    requests: int
    connections: int
    reason: str


def descriptor_budget(limit: int, in_use: int, requests: int) -> DescriptorBudget:
    """How many requests and client connections fit in `limit` descriptors of which `in_use`
    are taken. Beyond that, a connect fails with EMFILE (a 503 for a request already
    admitted) or, worse, an accept does (the client is reset without an answer).

    Unless `requests` is set, three quarters of what is spare go to admitted requests (three
    descriptors each) and a quarter to connections that are idle, queued or being told 429, so
    that clients beyond the budget mostly get an answer rather than wait in the backlog.
    Connections are capped at what the admitted requests leave.
    """
    spare = max(limit - in_use - RESERVE, PER_REQUEST)
    why = f"{limit} descriptors, {in_use} in use, {RESERVE} kept"
    if requests:
        why = f"--max-concurrent-requests {requests}; {why}"
    else:
        requests = max(spare // (PER_REQUEST + 1), 1)
    connections = max(spare - (PER_REQUEST - 1) * requests, 1)
    return DescriptorBudget(requests, connections, why)


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
