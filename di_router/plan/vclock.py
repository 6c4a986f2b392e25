"""Virtual time for the simulator's engine: an asyncio event loop whose clock jumps.

The engine takes its time from `Clock` (`now`, `sleep`, `call_later`), which sits on the running
event loop. Here the loop itself is virtual: its `time()` is a counter, and when nothing is ready
to run, the selector "waits" by moving the counter to the next timer instead of blocking. So
`asyncio.sleep`, `call_later` and `asyncio.timeout` all run in virtual time, and the same engine
code serves HTTP (the real loop) and planning (this one): one model, two clocks.

A virtual loop has no I/O: a coroutine that waits for a socket, or for nothing, never wakes up,
which `run` reports instead of hanging.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from di_router.sim.clock import Clock

T = TypeVar("T")


class Deadlock(RuntimeError):
    """Nothing is ready and no timer is pending: the run can never finish."""


class _VirtualSelector(selectors.BaseSelector):
    """No file descriptors ever become ready; `select(timeout)` advances virtual time."""

    def __init__(self) -> None:
        self.now = 0.0
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, id(fileobj), events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise Deadlock("virtual time: nothing to run and no timer pending")
        self.now += max(timeout, 0.0)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """An event loop that runs in virtual time, starting at 0 (see the module docstring)."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._virtual.now


class LoopClock(Clock):
    """`Clock` read from a loop's own time, so it is virtual on a virtual loop.

    (The base `Clock.now` reads `time.monotonic()`, which a virtual loop cannot move.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = loop.time  # type: ignore[method-assign]  # bound once: read per token


def run(main: Callable[[LoopClock], Coroutine[Any, Any, T]]) -> T:
    """`asyncio.run(main(clock))` on a fresh virtual loop and its clock: returns as soon as it is
    done, however much virtual time that took."""
    loop = VirtualEventLoop()
    try:
        return loop.run_until_complete(main(LoopClock(loop)))
    finally:
        loop.close()
