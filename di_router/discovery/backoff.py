"""Reconnect delays for etcd clients: exponential, capped, jittered."""

from __future__ import annotations

import random


class Backoff:
    """Doubling delays between `first_s` and `max_s`, each drawn from its upper half so that many
    workers and routers that lost etcd together do not all come back in the same instant."""

    def __init__(self, first_s: float = 0.1, max_s: float = 5.0) -> None:
        self._first = first_s
        self._max = max_s
        self._current = first_s

    def next(self) -> float:
        delay = random.uniform(self._current / 2, self._current)
        self._current = min(self._current * 2, self._max)
        return delay

    def reset(self) -> None:
        self._current = self._first
